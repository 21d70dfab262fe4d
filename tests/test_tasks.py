"""Built-in synthetic tasks: deterministic, answers right by an independent solver, difficulty knob,
held-out evaluation levels, chance floors."""

from __future__ import annotations

import re

import pytest

from hatlm.errors import UserError
from hatlm.tasks import TASKS, chance_accuracy, make_split, make_task


def independent_solve(name: str, prompt: str) -> str:
    """A second solver written from the task descriptions, sharing no code with hatlm.tasks."""
    if name == "parity":
        assert re.fullmatch(r"[01]+=", prompt)
        return "1" if sum(map(int, prompt[:-1])) % 2 else "0"
    if name == "binding":
        *stmts, q = prompt.split()
        assert q.startswith("?")
        q = q[1:]
        env = {}
        for st in stmts:
            lhs, rhs = re.fullmatch(r"([a-z])=([a-z0-9])", st).groups()
            assert lhs not in env, "each variable is bound once"
            env[lhs] = rhs
        while not q.isdigit():
            q = env[q]
        return q
    m = re.fullmatch(r"(.*) (>*)([a-z])", prompt)
    assert m, prompt
    body, arrows, start = m.groups()
    if name == "nearest":
        assert not arrows and re.fullmatch(r"[a-z]+", body) and start not in body
        ranked = sorted(body, key=lambda c: abs(ord(c) - ord(start)))
        assert abs(ord(ranked[0]) - ord(start)) < abs(ord(ranked[1]) - ord(start)), "the nearest is unique"
        return ranked[0]
    if name == "recall":
        pairs = re.findall(r"([a-z])(\d)", body)
        assert len({k for k, _ in pairs}) == len(pairs), "keys must be distinct"
        return dict(pairs)[start]
    if name == "reassign":
        value = None
        for var, val in re.findall(r"([a-z])(\d)", body):
            if var == start:
                value = val  # a later assignment overrides an earlier one
        assert value is not None
        return value
    edges = body.split()
    node = start
    for _ in arrows:
        (node,) = [e[1] for e in edges if e[0] == node]  # exactly one outgoing edge
    return node


def structure(name: str, prompt: str) -> int:
    """The difficulty as visible in the prompt: pairs, assignments, hops or bits."""
    if name == "parity":
        return len(prompt) - 1
    if name == "binding":
        *stmts, q = prompt.split()
        q = q[1:]
        env = dict(st.split("=") for st in stmts)
        hops = 0
        while not env[q].isdigit():
            q, hops = env[q], hops + 1
        return hops
    if name in ("chain", "pointer"):
        return prompt.count(">")
    if name == "nearest":
        return len(prompt.split()[0])
    return len(prompt.split()) - 1


@pytest.mark.parametrize("name", list(TASKS))
def test_answers_correct_and_difficulty_is_structure(name):
    fam = TASKS[name]
    for d in sorted(set(fam.train_difficulties + fam.eval_difficulties)):
        exs = make_task(name, 300, d, seed=5)
        assert len(exs) == 300
        for ex in exs:
            assert ex.answer == independent_solve(name, ex.prompt), ex
            assert structure(name, ex.prompt) == d
            assert ex.task == f"{name}/d{d}" and len(ex.answer) == 1
        assert len({ex.answer for ex in exs}) >= (2 if name == "parity" else 3)  # the answer varies
        assert max(len(ex.prompt) for ex in exs) <= (65 if name == "parity" else 70)


def test_reassign_needs_the_latest_binding():
    # the shortcuts a model could take instead are wrong: the queried variable's first value
    # and the last value in the prompt never answer it
    for ex in make_task("reassign", 300, 5, seed=1):
        stmts = re.findall(r"([a-z])(\d)", ex.prompt)
        q = ex.prompt[-1]
        assert [v for var, v in stmts if var == q][0] != ex.answer
        assert stmts[-1][0] != q


@pytest.mark.parametrize("name", list(TASKS))
def test_deterministic_per_seed(name):
    d = TASKS[name].train_difficulties[0]
    assert make_task(name, 50, d, seed=1) == make_task(name, 50, d, seed=1)
    assert make_task(name, 50, d, seed=1) != make_task(name, 50, d, seed=2)
    assert make_split(name, 3, 60, 20) == make_split(name, 3, 60, 20)


@pytest.mark.parametrize("name", list(TASKS))
def test_split_holds_out_levels_and_instances(name):
    train, evals = make_split(name, seed=0, n_train=400, n_eval=50, train_difficulties=None, eval_difficulties=None)
    fam = TASKS[name]
    assert len(train) == 400
    train_levels = {ex.task for ex in train}
    assert train_levels == {f"{name}/d{d}" for d in fam.train_difficulties}
    assert list(evals) == [f"{name}/d{d}" for d in fam.eval_difficulties]
    held_out = set(evals) - train_levels
    assert held_out, "some evaluation levels are never trained on"
    # held-out levels are harder than every training level
    assert min(int(t.split("/d")[1]) for t in held_out) > max(fam.train_difficulties)
    train_prompts = {ex.prompt for ex in train}
    for label, exs in evals.items():
        assert len(exs) == 50 and all(ex.task == label for ex in exs)
        assert not train_prompts & {ex.prompt for ex in exs}
        assert len({ex.prompt for ex in exs}) == 50


def test_pointer_table_is_a_fixed_size_permutation_and_binding_has_distractors():
    for d in (1, 4, 6):
        for ex in make_task("pointer", 100, d, seed=2):
            entries = ex.prompt.split()[:-1]
            assert len(entries) == 6
            assert sorted(e[0] for e in entries) == sorted(e[1] for e in entries)  # a permutation
            assert all(e[0] != e[1] for e in entries)
    for d in (0, 2, 4):
        for ex in make_task("binding", 100, d, seed=2):
            digits = re.findall(r"=(\d)", ex.prompt)
            assert len(digits) == len(set(digits)) == 3  # the queried chain and two distractor chains
    assert {ex.prompt.count("=") for ex in make_task("binding", 50, 0, seed=1)} != {1}


def test_chance_floor():
    assert chance_accuracy("recall", 4) == pytest.approx(0.25)
    assert chance_accuracy("nearest", 5) == pytest.approx(0.2)
    assert chance_accuracy("chain", 2) == pytest.approx(0.25)
    assert chance_accuracy("parity", 30) == 0.5
    assert chance_accuracy("pointer", 3) == pytest.approx(1 / 6)
    assert chance_accuracy("binding", 0) == chance_accuracy("binding", 4) == pytest.approx(1 / 3)
    r3, r9 = chance_accuracy("reassign", 3), chance_accuracy("reassign", 9)
    assert 0.1 <= r9 < r3 <= 0.5
    # harder levels never have a higher floor
    for name, fam in TASKS.items():
        floors = [chance_accuracy(name, d) for d in sorted(fam.eval_difficulties)]
        assert floors == sorted(floors, reverse=True)


def test_bad_task_arguments():
    with pytest.raises(UserError, match="unknown task 'nope'"):
        make_task("nope", 1, 1, 0)
    with pytest.raises(UserError, match=r"difficulty must be an integer in \[2, 10\]"):
        make_task("recall", 1, 11, 0)
    with pytest.raises(UserError, match="at least one"):
        make_split("chain", 0, 10, 10, [], [1])
