"""The slow list in conftest.py is keyed by node ids: a renamed test must not slip through it."""

from __future__ import annotations

import pytest
from conftest import COLLECTED, SLOW_IN_DEFAULT_RUN, stale_slow_keys


@pytest.fixture
def fake_tests(tmp_path, monkeypatch):
    (tmp_path / "test_a.py").write_text("def test_kept(x):\n    pass\n", encoding="utf-8")
    monkeypatch.setattr("conftest.SLOW_IN_DEFAULT_RUN", {}, raising=True)
    import conftest

    return tmp_path, conftest.SLOW_IN_DEFAULT_RUN


def test_every_key_of_the_real_slow_list_names_a_collected_test(request):
    # every collected test, the ones `-m "not slow"` deselected included (session.items lacks them)
    assert request.node.nodeid.removeprefix("tests/") in COLLECTED
    assert stale_slow_keys(request.config.rootpath / "tests", COLLECTED) == []
    assert SLOW_IN_DEFAULT_RUN  # the check above read a real list


def test_a_renamed_test_function_is_reported(fake_tests):
    tests_dir, slow = fake_tests
    slow["test_a.py::test_kept"] = "why"
    slow["test_a.py::test_renamed"] = "why"
    assert stale_slow_keys(tests_dir, []) == ["test_a.py::test_renamed"]


def test_a_renamed_parameter_is_reported_when_its_siblings_are_collected(fake_tests):
    tests_dir, slow = fake_tests
    slow["test_a.py::test_kept[old]"] = "why"
    collected = ["test_a.py::test_kept[new]", "test_a.py::test_kept[other]"]
    assert stale_slow_keys(tests_dir, collected) == ["test_a.py::test_kept[old]"]
    # one parameter picked on the command line: the others are not collected, nothing to judge
    assert stale_slow_keys(tests_dir, ["test_a.py::test_kept[new]"]) == []
    assert stale_slow_keys(tests_dir, ["test_a.py::test_kept[old]", "test_a.py::test_kept[new]"]) == []


def test_a_missing_file_is_reported(fake_tests):
    tests_dir, slow = fake_tests
    slow["test_gone.py::test_x"] = "why"
    assert stale_slow_keys(tests_dir, []) == ["test_gone.py::test_x"]
