"""Audit 53 review: regressions found reviewing the audit-53 commits."""
import pytest

from jaxformers.data.domains import parse_domains_spec


@pytest.mark.parametrize("spec", ["domains:a=shakespeare,b=python:text_field=content",
                                  "domains:a=default,b=noise:text_field=content",
                                  "domains:comedies,b=pystdlib:text_field=content"])
def test_domains_text_field_refused_when_every_source_is_built_in(spec):
    # built-in corpora have no fields (load_corpus refuses text_field for them): a spec whose
    # every SOURCE is built-in silently ignored the option
    with pytest.raises(ValueError, match="no domain has such a SOURCE"):
        parse_domains_spec(spec)


def test_domains_text_field_still_applies_beside_a_built_in_corpus(tmp_path):
    (tmp_path / "a").mkdir()
    assert parse_domains_spec(f"domains:a={tmp_path / 'a'},b=python:text_field=content").text_field == "content"
