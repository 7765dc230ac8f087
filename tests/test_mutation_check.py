"""The mutation check (tests/mutation_check.py, docs/testing.md) stays applicable to the code as it is: each
mutation's text occurs exactly once in its file, and each test it names exists. (Running the mutations is the
check itself, too long for `make test`.)"""

from __future__ import annotations

import re

import pytest
from mutation_check import MUTATIONS, ROOT


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name[:60] for m in MUTATIONS])
def test_the_mutation_still_applies_and_its_tests_exist(mutation):
    text = (ROOT / mutation.file).read_text()
    assert text.count(mutation.find) == 1, f"update tests/mutation_check.py: {mutation.file} changed"
    assert mutation.replace != mutation.find
    for node in mutation.tests:
        path, _, name = node.partition("::")
        assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), node


def test_at_least_ten_guarantees_are_mutated():
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS) >= 10
