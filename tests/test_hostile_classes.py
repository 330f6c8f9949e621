"""Hostile input, round two: every class of issue 12 handled (the quick subset of each class of
``tests/hostile_classes.py``; ``benchmarks/reliability.py --round-two`` runs them all)."""
import shutil

import pytest

import hostile_classes as R


@pytest.fixture(scope="module")
def corpus():
    corpus = R.new_corpus()
    yield corpus
    shutil.rmtree(corpus.work, ignore_errors=True)


@pytest.mark.parametrize("name", list(R.CLASSES))
def test_every_case_of_the_class_is_handled(corpus, name):
    failed = [(case, code, problems, err.strip().splitlines()[-1:] if err.strip() else [])
              for case, code, err, problems in R.run_class(corpus, name, quick=True) if problems]
    assert not failed, "\n".join(f"{case}: exit {code}: {problems} {last}" for case, code, problems, last in failed)


def test_the_quick_subsets_are_not_empty(corpus):
    for name, generator in R.CLASSES.items():
        assert list(generator(corpus, True)), name
