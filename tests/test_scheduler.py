"""gfnet._C.EarlyExitScheduler driven directly, with a table of per-image max probabilities in place
of a network; the driver tracks every slot itself and checks the scheduler against it."""
import pytest
import torch

import gfnet._C as _C

Scheduler = _C.EarlyExitScheduler


def drive(max_probs, thresholds, batch_size, capacity=None, admit_limit=None):
    """Run the scheduler over images whose max probability at step k is ``max_probs[i, k]`` and whose
    prediction there is 100 * i + k. Returns (scheduler, batches run as (step, size, stream_ended))."""
    n, T = max_probs.shape
    capacity = T * batch_size if capacity is None else capacity
    sched = Scheduler(capacity, batch_size, torch.as_tensor(thresholds, dtype=torch.float64))
    slot_image, slot_step = {}, {}
    next_image, batches = 0, []
    while not sched.done():
        step, slots = sched.next_batch()
        if step == Scheduler.ADMIT:
            wanted = sched.wanted()
            assert 1 <= wanted <= batch_size
            count = min(wanted, n - next_image, admit_limit or wanted)
            if count == 0:
                sched.end_stream()
                continue
            new_slots, ids = sched.admit(count)
            assert ids.tolist() == list(range(next_image, next_image + count))
            for slot, image in zip(new_slots.tolist(), ids.tolist()):
                assert slot not in slot_image, "a busy slot was handed out again"
                assert 0 <= slot < capacity
                slot_image[slot], slot_step[slot] = image, 0
            next_image += count
            continue
        assert 1 <= len(slots) <= batch_size and len(set(slots.tolist())) == len(slots)
        images = [slot_image[s] for s in slots.tolist()]
        assert all(slot_step[s] == step for s in slots.tolist()), "an image ran a step out of turn"
        probs = torch.tensor([float(max_probs[i, step]) for i in images], dtype=torch.float32)
        preds = torch.tensor([100 * i + step for i in images])
        exited = sched.report(step, slots, probs, preds)
        for s, gone in zip(slots.tolist(), exited.tolist()):
            if gone:
                del slot_image[s], slot_step[s]
            else:
                slot_step[s] += 1
        batches.append((step, len(slots), sched.stream_ended))
    assert not slot_image and sched.num_active == 0 and sched.num_free == capacity
    return sched, batches


def expected_exits(max_probs, thresholds):
    n, T = max_probs.shape
    steps = []
    for i in range(n):
        k = next((k for k in range(T - 1) if float(max_probs[i, k]) >= thresholds[k]), T - 1)
        steps.append(k)
    return torch.tensor(steps, dtype=torch.long)


def check_results(sched, max_probs, thresholds):
    preds, steps = sched.results()
    want = expected_exits(max_probs, thresholds)
    assert torch.equal(steps, want)
    assert torch.equal(preds, torch.arange(len(want)) * 100 + want)


@pytest.mark.parametrize("n,T,batch_size", [(200, 5, 16), (97, 3, 8), (64, 4, 1), (33, 2, 7), (50, 1, 8)])
def test_random_stream_matches_first_passing_step(n, T, batch_size):
    g = torch.Generator().manual_seed(n * T + batch_size)
    max_probs = torch.rand(n, T, generator=g)
    thresholds = [0.7] * (T - 1) + [-1e8]
    sched, batches = drive(max_probs, thresholds, batch_size)
    check_results(sched, max_probs, thresholds)
    # continuous batching: while the stream is open every batch is full
    assert all(size == batch_size for _, size, ended in batches if not ended)
    assert sched.num_admitted == sched.num_finished == n
    counts = torch.bincount(expected_exits(max_probs, thresholds), minlength=T)
    # an image runs steps 0..exit: step k runs the images exiting at k or later
    assert sched.step_images == [int(counts[k:].sum()) for k in range(T)]


def test_all_exit_at_the_glance():
    max_probs = torch.rand(40, 4, generator=torch.Generator().manual_seed(1))
    thresholds = [-1.0, 0.5, 0.5, -1e8]
    sched, batches = drive(max_probs, thresholds, 8)
    check_results(sched, max_probs, thresholds)
    assert {step for step, _, _ in batches} == {0} and sched.step_images == [40, 0, 0, 0]


def test_none_exit_before_the_last_step():
    max_probs = torch.rand(37, 3, generator=torch.Generator().manual_seed(2))
    thresholds = [1e8, 1e8, -1e8]
    sched, batches = drive(max_probs, thresholds, 8)
    check_results(sched, max_probs, thresholds)
    assert sched.step_images == [37, 37, 37]
    assert sched.results()[1].tolist() == [2] * 37


def test_stream_shorter_than_the_batch():
    max_probs = torch.rand(3, 3, generator=torch.Generator().manual_seed(3))
    thresholds = [0.5, 0.5, -1e8]
    sched, batches = drive(max_probs, thresholds, 16)
    check_results(sched, max_probs, thresholds)
    assert all(size <= 3 for _, size, _ in batches) and sched.partial_batches == len(batches)
    # the tail drains shallowest-first: at most one batch per step
    assert [step for step, _, _ in batches] == sorted(step for step, _, _ in batches)


def test_empty_stream():
    sched = Scheduler(8, 4, torch.tensor([0.5, -1e8]))
    step, _ = sched.next_batch()
    assert step == Scheduler.ADMIT
    sched.end_stream()
    assert sched.done() and sched.results()[0].numel() == 0


def test_single_step_model_and_batch_one():
    max_probs = torch.rand(9, 1, generator=torch.Generator().manual_seed(4))
    sched, batches = drive(max_probs, [0.99], 1)  # T=1: the only threshold is ignored, all exit at step 0
    check_results(sched, max_probs, [0.99])
    assert sched.results()[1].tolist() == [0] * 9 and len(batches) == 9


def test_small_capacity_and_trickling_admissions():
    # a capacity below T * (B - 1) + 1 cannot always fill a batch: full tables run partial batches
    max_probs = torch.rand(60, 4, generator=torch.Generator().manual_seed(5))
    thresholds = [0.8, 0.6, 0.4, -1e8]
    sched, _ = drive(max_probs, thresholds, 8, capacity=9)
    check_results(sched, max_probs, thresholds)
    # the stream gives fewer images than asked for, a few at a time (a loader's batch boundaries)
    sched, _ = drive(max_probs, thresholds, 8, admit_limit=3)
    check_results(sched, max_probs, thresholds)


def test_deepest_full_step_runs_first():
    sched = Scheduler(9, 2, torch.tensor([1e8, 1e8, -1e8]))  # nobody exits before the last step
    assert sched.next_batch()[0] == Scheduler.ADMIT and sched.wanted() == 2
    first, _ = sched.admit(2)
    step, slots = sched.next_batch()
    assert step == 0 and slots.tolist() == first.tolist()
    sched.report(0, slots, torch.zeros(2), torch.zeros(2, dtype=torch.long))
    # a full step 1 runs before any new image is asked for
    step, slots = sched.next_batch()
    assert step == 1 and slots.tolist() == first.tolist()
    sched.report(1, slots, torch.zeros(2), torch.zeros(2, dtype=torch.long))
    sched.admit(2)  # admitting ahead of time is allowed: now steps 0 and 2 are both full
    assert sched.ready_counts == [2, 0, 2]
    step, deeper = sched.next_batch()
    assert step == 2 and deeper.tolist() == first.tolist()


def test_results_in_stream_order_and_pop_finished():
    sched = Scheduler(4, 2, torch.tensor([0.5, -1e8]))
    assert sched.next_batch()[0] == Scheduler.ADMIT
    slots, ids = sched.admit(2)
    step, batch = sched.next_batch()
    # image 0 stays, image 1 exits: nothing can be popped until image 0 finishes
    sched.report(step, batch, torch.tensor([0.1, 0.9]), torch.tensor([7, 8]))
    first, preds, steps = sched.pop_finished()
    assert first == 0 and preds.numel() == 0
    sched.end_stream()
    step, batch = sched.next_batch()
    assert step == 1 and batch.tolist() == [slots[0].item()]
    sched.report(step, batch, torch.tensor([0.2]), torch.tensor([5]))
    first, preds, steps = sched.pop_finished()
    assert first == 0 and preds.tolist() == [5, 8] and steps.tolist() == [1, 0]
    assert sched.done()


def test_misuse_is_reported():
    with pytest.raises(RuntimeError, match="capacity"):
        Scheduler(2, 4, torch.tensor([0.5, -1e8]))
    with pytest.raises(RuntimeError, match="thresholds"):
        Scheduler(8, 4, torch.zeros(2, 2))
    sched = Scheduler(8, 4, torch.tensor([0.5, -1e8]))
    with pytest.raises(RuntimeError, match="no batch is in flight"):
        sched.report(0, torch.zeros(1, dtype=torch.long), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="free"):
        sched.admit(9)
    sched.next_batch()
    sched.admit(4)
    step, slots = sched.next_batch()
    with pytest.raises(RuntimeError, match="report"):
        sched.next_batch()
    with pytest.raises(RuntimeError, match="step"):
        sched.report(1, slots, torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="max_probs"):
        sched.report(0, slots, torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="preds"):
        sched.report(0, slots, torch.zeros(4), torch.zeros(4))
    with pytest.raises(RuntimeError, match="slot"):
        sched.report(0, slots.flip(0), torch.zeros(4), torch.zeros(4, dtype=torch.long))
    sched.report(0, slots, torch.ones(4), torch.zeros(4, dtype=torch.long))
    sched.end_stream()
    assert sched.done()
    with pytest.raises(RuntimeError, match="stream was ended"):
        sched.admit(1)
    with pytest.raises(RuntimeError, match="exited"):
        sched.next_batch()
