"""Batches by network set (lib_consistency/story/batches.py, issue 24): properties over random stories, and the
story plan built on them."""
from __future__ import annotations

import random

import pytest

from lib_consistency.settings import Settings
from lib_consistency.story.batches import (bank_role, default_references, drawing_order, host_slices, plan_batches,
                                           story_order)
from lib_consistency.story.run import plan_story_run


def random_cases(count=400, seed=3):
    """(networks, limit, references): up to 12 frames over up to 4 network sets, any limit, references a story
    prefix (the user's *Reference frames*), the default ones, or none."""
    rng = random.Random(seed)
    for _ in range(count):
        frames = rng.randint(1, 12)
        sets = rng.randint(1, 4)
        networks = [rng.randrange(sets) for _ in range(frames)]
        limit = rng.choice([0, 1, 2, 3, 4, 5, 8, 16])
        kind = rng.choice(["prefix", "default", "none"])
        if kind == "prefix":
            references = tuple(range(rng.randint(1, min(frames, limit or frames))))
        else:
            references = default_references(networks, limit) if kind == "default" else ()
        yield networks, limit, references


@pytest.mark.parametrize("networks, limit, references", list(random_cases()))
def test_every_plan_keeps_its_promises(networks, limit, references):
    batches = plan_batches(networks, limit, references)
    order = drawing_order(batches)
    assert sorted(order) == list(range(len(networks)))  # every frame exactly once
    assert all(len({networks[f] for f in batch}) == 1 for batch in batches)  # one network set per batch
    assert all(0 < len(batch) <= (limit or len(networks)) for batch in batches)  # the limit is an upper bound
    assert all(list(batch) == sorted(batch) for batch in batches)  # story order within a batch
    for key in set(networks):  # a set's frames are drawn in story order, in as few batches as the limit allows
        frames = [f for f in order if networks[f] == key]
        if not set(frames) & set(references):
            assert frames == sorted(frames)
        in_batches = [b for b in batches if networks[b[0]] == key]
        assert len(in_batches) == -(-len(frames) // (limit or len(networks)))
    writers = [any(f in references for f in batch) for batch in batches]
    assert writers == sorted(writers, reverse=True)  # reference frames are drawn before every batch reading them
    assert [order[k] for k in story_order(order)] == list(range(len(networks)))  # the permutation restores it
    roles = [bank_role(batches, references, i) for i in range(len(batches))]
    if references and not all(writers):
        assert roles == ["write" if w else "read" for w in writers]
    else:
        assert set(roles) == {"off"}


@pytest.mark.parametrize("count, limit", [(n, k) for n in range(1, 10) for k in range(0, 11)])
def test_one_network_set_is_the_plan_of_before(count, limit):
    """Plain stories: runs of the limit in story order, the host's own slices, the first batch as references."""
    batches = plan_batches([("<lora:a:1>",)] * count, limit, default_references([()] * count, limit))
    size = min(limit or count, count)
    assert batches == tuple(tuple(range(s, min(s + size, count))) for s in range(0, count, size))
    assert host_slices(batches) and drawing_order(batches) == tuple(range(count))
    assert default_references([()] * count, limit) == tuple(range(size))


def test_story_order_of_an_interrupted_job_sorts_what_was_drawn():
    order = (0, 2, 5, 1, 3)  # the first batches of a story drawn out of order, the rest never drawn
    assert [order[k] for k in story_order(order)] == [0, 1, 2, 3, 5]


def test_batches_out_of_story_order_or_uneven_are_not_the_host_slices():
    assert host_slices(((0, 1), (2, 3), (4,)))
    assert not host_slices(((0, 2), (1, 3)))  # out of story order
    assert not host_slices(((0,), (1, 2)))  # in order, but a short batch before a full one
    assert plan_batches(["a", "b", "a", "b", "a"], 2) == ((0, 2), (4,), (1, 3))
    assert plan_batches(["a", "b", "a", "b", "a"], 2, references=(3,)) == ((1, 3), (0, 2), (4,))


LILY_TOM = ("Lily: a girl <lora:lily:1>\nTom: an old man <lora:tom:1>\n---\n[Lily] reads\n[Tom] walks\n[Lily] sleeps\n"
            "[Tom] sits\n[Lily] [Tom] talk\n[NC] rain <oneactor:x>\n[Lily] runs")


def settings(**values):
    return Settings.from_dict({"enabled": True, "story": LILY_TOM, **values})


def test_story_plan_groups_frames_by_their_networks_oneactor_excepted():
    plan = plan_story_run(settings(frames_per_batch=2, preset="StoryDiffusion"), "ink", 5)
    # sets: Lily {0, 2, 6}, Tom {1, 3}, Lily+Tom {4}, none {5} (OneActor acts per image)
    assert plan.batches == ((0, 2), (1, 3), (4,), (5,), (6,))
    assert plan.batch_size == 2 and plan.batch_count == 5 and not plan.in_story_order and not plan.host_slices
    assert plan.reference_frames == (0, 1, 2, 3, 4, 5)  # the first batch of every set writes the bank
    assert [plan.bank_role(i) for i in range(5)] == ["write"] * 4 + ["read"]
    assert [plan.batch_of(f) for f in range(7)] == [0, 1, 0, 1, 2, 3, 4]


def test_story_plan_draws_the_chosen_reference_frames_first():
    plan = plan_story_run(settings(frames_per_batch=2, preset="StoryDiffusion", reference_frames=2), "", 5)
    assert plan.reference_frames == (0, 1) and plan.batches == ((0, 2), (1, 3), (6,), (4,), (5,))
    assert [plan.bank_role(i) for i in range(5)] == ["write", "write", "read", "read", "read"]
    one_batch_each = plan_story_run(settings(preset="StoryDiffusion"), "", 5)  # every batch writes: no bank
    assert one_batch_each.batches == ((0, 2, 6), (1, 3), (4,), (5,)) and one_batch_each.reference_frames == ()


def test_story_plan_without_different_networks_is_unchanged():
    plain = plan_story_run(settings(story="a fox <lora:fox:1>\nruns\nsits\nsleeps", frames_per_batch=2,
                                    preset="StoryDiffusion"), "ink <lora:ink:1>", 5)
    assert plain.batches == ((0, 1), (2,)) and plain.reference_frames == (0, 1) and plain.host_slices
