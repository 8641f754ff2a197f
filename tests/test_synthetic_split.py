"""Held-out problems of the synthetic tasks: training draws never hold a validation problem."""
import numpy as np
import pytest

from jaxformers.data import open_data, synthetic
from jaxformers.data.loader import SyntheticLoader

TASKS = {  # small problem spaces, where repeats between draws are certain
    "arithmetic": lambda m, s: synthetic.arithmetic(m, 2, seed=s),                  # 10^4 sums
    "copying": lambda m, s: synthetic.copying(m, 10, 8, seed=s),                     # 3^4 strings
    "recall": lambda m, s: synthetic.associative_recall(m, 2, 11, seed=s),            # 108 problems
    "passkey": lambda m, s: synthetic.passkey(m, 120, 2, seed=s),                    # 90 keys x depths
}


def _problems(tokens, mask):
    return {tuple(r) for r in np.where(mask > 0, -1, tokens).tolist()}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_train_and_heldout_draws_never_share_a_problem(task):
    make = TASKS[task]
    train = synthetic.draw_split(make, 3000, 0, "train")
    held = synthetic.draw_split(make, 200, 1, "heldout")
    assert train[0].shape[0] == 3000 and held[0].shape[0] == 200
    assert not synthetic.is_heldout(*train).any() and synthetic.is_heldout(*held).all()
    assert not _problems(*train) & _problems(*held)
    # without a split the same seeds repeat problems across the two draws
    assert _problems(*make(3000, 0)) & _problems(*make(200, 1)) or task == "passkey"
    # a pure function of (n, seed, split); each kept example is the task's own (answers right)
    again = synthetic.draw_split(make, 200, 1, "heldout")
    assert all(np.array_equal(a, b) for a, b in zip(held, again))
    if task == "arithmetic":
        for row in held[0][:20]:
            a, b = synthetic.decode_arithmetic(row)[1:].split("=")[0].split("+")
            assert synthetic.decode_arithmetic(row).endswith(f"|{int(a) + int(b):03d}$")
    assert np.array_equal(synthetic.draw_split(make, 5, 7)[0], make(5, 7)[0])    # split=None


def test_the_held_out_share_of_a_whole_space_is_one_in_sixteen():
    """Every 3-digit sum (10^6 problems): the held-out share is 1/16 within 3 standard errors
    (0.0625 +- 0.0007; a first, weaker hash held out 0.0612), also within each units-digit pair."""
    template, mask = synthetic.arithmetic(1, 3, worked_steps=False, seed=0)
    a, b = (x.ravel() for x in np.meshgrid(np.arange(1000), np.arange(1000), indexing="ij"))
    tokens = np.repeat(template, a.size, axis=0)
    for i, p in enumerate((100, 10, 1)):    # ^ a a a + b b b = ...: digits most significant first
        tokens[:, 1 + i] = a // p % 10 + synthetic.N_SPECIAL
        tokens[:, 5 + i] = b // p % 10 + synthetic.N_SPECIAL
    assert synthetic.decode_arithmetic(tokens[123456]).startswith("^123+456=")
    held = synthetic.is_heldout(tokens, np.repeat(mask, a.size, axis=0))
    assert abs(held.mean() - 1 / 16) < 3 * (1 / 16 * 15 / 16 / a.size) ** 0.5
    cells = np.bincount(a % 10 * 10 + b % 10, weights=held) / (a.size / 100)
    assert cells.min() > 0.05 and cells.max() < 0.075


def test_the_loaders_train_on_training_problems_and_validate_on_held_out_ones():
    spec = "synthetic:arithmetic:n_digits=2,pack=0,val_rows=64"
    length = synthetic.arithmetic_length(2)
    src = open_data(spec)
    val = src.split_rows(length - 1, "val")
    assert synthetic.is_heldout(val["tokens"], val["loss_mask"]).all()
    train_rows = src.split_rows(length - 1, "train")
    assert not synthetic.is_heldout(train_rows["tokens"], train_rows["loss_mask"]).any()
    loader = SyntheticLoader("arithmetic", 64, length - 1, seed=0, params={"n_digits": 2, "pack": 0},
                             process_index=0, process_count=1)
    seen = set()
    for step in range(40):
        b = loader.batch_dict_at(step)
        assert not synthetic.is_heldout(b["tokens"], b["loss_mask"]).any()
        seen |= _problems(b["tokens"], b["loss_mask"])
    assert len(seen) > 1500 and not seen & _problems(val["tokens"], val["loss_mask"])


def test_a_space_without_held_out_problems_and_bad_splits_are_errors():
    one_problem = lambda m, s: synthetic.copying(m, 4, 6, seed=s)                   # noqa: E731
    split = "heldout" if not synthetic.is_heldout(*one_problem(1, 0))[0] else "train"
    with pytest.raises(ValueError, match=f"the '{split}' split after 40 rounds"):
        synthetic.draw_split(one_problem, 4, 0, split)
    with pytest.raises(ValueError, match=r"split must be one of \[None, 'train', 'heldout'\]"):
        synthetic.draw_split(one_problem, 4, 0, "val")


def _operands(tokens, n_digits=2):
    return {tuple(r) for r in tokens[:, 1:synthetic.arithmetic_prompt_length(n_digits)].tolist()}


def test_a_sums_problem_is_its_operands_whatever_the_format():
    """worked_steps / answer_only change what follows ``BOS a + b =``, not whether the sum is held
    out (the whole tail used to enter the hash: ~11% of the 2-digit sums changed side)."""
    plen = synthetic.arithmetic_prompt_length(2)
    labels = []
    for steps in (True, False):
        for answer_only in (False, True):
            t, m = synthetic.arithmetic(20000, 2, steps, seed=3, answer_only=answer_only)
            labels.append(synthetic.is_heldout(t, m, prompt_len=plen))
    assert all(np.array_equal(labels[0], x) for x in labels[1:]) and 0.04 < labels[0].mean() < 0.09
    from jaxformers.data.loader import synthetic_rows
    train = synthetic_rows("arithmetic", 3000, 64, 0, {"n_digits": 2, "pack": 0}, "train")["tokens"]
    for params in ({"answer_only": 1}, {"worked_steps": 0}, {"worked_steps": 0, "answer_only": 1}):
        held = synthetic_rows("arithmetic", 300, 64, 1, {"n_digits": 2, "pack": 0, **params}, "heldout")
        assert not _operands(held["tokens"]) & _operands(train), params


def test_the_label_ignores_padding_length_and_token_dtype():
    short, ms = synthetic.copying(4000, 10, 8, seed=5)
    odd, mo = synthetic.copying(4000, 11, 8, seed=5)            # the same strings, one PAD more
    assert np.array_equal(short, odd[:, :10])
    want = synthetic.is_heldout(short, ms)
    assert np.array_equal(synthetic.is_heldout(odd, mo), want) and want.any()
    for dtype in (np.uint8, np.uint16, np.uint32, np.int16, np.int64):
        assert np.array_equal(synthetic.is_heldout(short.astype(dtype), ms), want), dtype
    with pytest.raises(ValueError, match=r"must be \[N, T\] arrays of one shape"):
        synthetic.is_heldout(short[0], ms[0])
    with pytest.raises(ValueError, match="prompt_len must be <= the examples' length 10"):
        synthetic.is_heldout(short, ms, prompt_len=11)


@pytest.mark.parametrize("spec", ["synthetic:arithmetic:answer_only=2", "synthetic:arithmetic:worked_steps=-1",
                                  "synthetic:recall:pack=5"])
def test_flag_parameters_are_0_or_1(spec):
    with pytest.raises(ValueError, match="must be 0 or 1"):
        open_data(spec)


def test_a_task_without_held_out_problems_fails_before_training(tmp_path):
    """copying with one symbol has one problem: if it is a training one, the run used to train to
    the end and fail at its first evaluation (and again on every --resume)."""
    from jaxformers import get_config
    from jaxformers.training import TrainConfig, train

    seq_len = next(t for t in range(16, 40)
                   if not synthetic.is_heldout(*synthetic.copying(1, t + 1, 6, seed=0))[0])
    src = open_data("synthetic:copying:vocab=6")
    with pytest.raises(ValueError, match="the 'heldout' split after 40 rounds"):
        src.has_eval_data(seq_len)
    tc = TrainConfig(data="synthetic:copying:vocab=6", steps=3, batch_size=2, seq_len=seq_len,
                     eval_every=0, log_every=1, checkpoint_every=1, out_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="the 'heldout' split after 40 rounds"):
        train(get_config("gpt", "tiny", d_model=16, n_layer=1, n_head=2, vocab_size=6, max_seq_len=64), tc)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
