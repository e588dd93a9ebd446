"""The one id type: parsing, string forms, and refusal of unsafe ids."""

from __future__ import annotations

import pytest

from adapterfab.errors import InvalidId
from adapterfab.ids import AdapterId, check_id, job_id


def test_parse_forms() -> None:
    assert AdapterId.parse("acme/pirate") == AdapterId("acme", "pirate")
    assert AdapterId.parse("acme/pirate@3") == AdapterId("acme", "pirate", version=3)
    assert AdapterId.parse("acme/pirate@production") == AdapterId("acme", "pirate", alias="production")
    for text in ("acme/pirate", "acme/pirate@3", "acme/pirate@production"):
        assert str(AdapterId.parse(text)) == text


def test_string_forms() -> None:
    a = AdapterId("acme", "pirate")
    assert a.registry_name == "af.acme.pirate"
    assert AdapterId.from_registry_name(a.registry_name) == a
    assert a.artifact_prefix("b-1.acme.pirate") == "adapters/acme/pirate/b-1.acme.pirate/"
    assert job_id("b-20260101-000000-abc123", "acme", "pirate") == "b-20260101-000000-abc123.acme.pirate"


@pytest.mark.parametrize("text", ["acme", "acme/pirate/x", "../etc/passwd", "/acme/pirate", "acme/pirate@",
                                  "acme/pirate@0", "acme/pirate@v1", "acme/pirate@latest", "ACME/pirate",
                                  "acme/pi rate", "acme/\u0440irate", "acme/" + "p" * 64, "acme/pirate@a@b",
                                  # past MLflow's 32-bit version column: its server answered 500 to every retry
                                  "acme/pirate@2147483648", "acme/pirate@9223372036854775808",
                                  "acme/pirate@" + "9" * 5000, "acme/pirate@" + "0" * 5000 + "1"])
def test_refused(text: str) -> None:
    with pytest.raises(InvalidId):
        AdapterId.parse(text)


def test_check_id_message_names_rule() -> None:
    with pytest.raises(InvalidId, match="lowercase a-z"):
        check_id("..", "tenant")
    with pytest.raises(InvalidId):
        AdapterId("acme", "pirate", version=1, alias="production")
    with pytest.raises(InvalidId):
        AdapterId("acme", "pirate").artifact_prefix("../x")


@pytest.mark.parametrize("text", ["acme/pirate\n", "acme\n/pirate", "acme/pirate@v1\n", "acme/pirate@\u00b2",
                                  "acme/pirate@\u0661\u0662", "acme/pirate@candidate\n"])
def test_trailing_newlines_and_unicode_digits_are_refused(text: str) -> None:
    """Ids are matched whole (a regex "$" also matches before a final newline) and versions are ASCII
    digits ("\u00b2".isdigit() is True, int() refuses it)."""
    with pytest.raises(InvalidId):
        AdapterId.parse(text)
    with pytest.raises(InvalidId):
        check_id(text.split("/")[0] + "\n")


def test_the_largest_version_mlflow_keeps_is_taken() -> None:
    from adapterfab.ids import MAX_VERSION

    assert AdapterId.parse(f"acme/pirate@{MAX_VERSION}").version == MAX_VERSION == 2**31 - 1
    assert AdapterId.parse("acme/pirate@007").version == 7
