"""The event-driven step simulator of gradient codes, and the code comparison."""

from __future__ import annotations

import numpy as np
import pytest

from codedgrad.codes import CodeError, RepetitionCode, make_code
from codedgrad.codes.simulate import compare_codes, simulate_code, task_times
from codedgrad.profile import WorkerProfile

# Speeds 4× apart, exponential task times (std = mean): every rank straggles now and then.
STRAGGLING = [WorkerProfile(0.0, 1.0 / s, 1.0 / s) for s in (4, 3, 2, 1.5, 1.2, 1)]


def test_uncoded_deterministic_step_is_the_slowest_rank():
    profiles = [WorkerProfile(0.5, 0.1, 0), WorkerProfile(0.0, 0.3, 0), WorkerProfile(2.0, 0.2, 0)]
    code = make_code("uncoded", 3, 40, 1.0, profiles)
    expected = max(p.shift + k * p.mean for p, k in zip(profiles, code.primaries))
    times = simulate_code(code, profiles, steps=20)
    np.testing.assert_allclose(times, expected, rtol=1e-12)
    np.testing.assert_allclose(simulate_code(code, profiles, steps=5, allreduce_time=0.25), expected + 0.25)


def test_rank_level_deterministic_step_is_the_first_decodable_moment():
    profiles = [WorkerProfile(0.1 * r, 0.2 + 0.1 * r, 0) for r in range(6)]
    for name, omega in (("frc", 2), ("frc", 3), ("cyclic", 2), ("cyclic", 3)):
        code = make_code(name, 6, 30, omega, profiles)
        finish = {r: p.shift + len(code.queue(r)[0].tasks) * p.mean for r, p in enumerate(profiles)}
        # The first finish time at which the ranks done so far decode (independently of the heap).
        expected = next(t for t in sorted(finish.values()) if code.tolerates([r for r in finish if finish[r] > t]))
        assert simulate_code(code, profiles, steps=3) == pytest.approx([expected] * 3), name


def test_redundancy_helps_on_straggling_workers():
    means = [
        simulate_code(make_code("repetition", 6, 120, omega, STRAGGLING), STRAGGLING, steps=600).mean()
        for omega in (1.0, 1.1, 1.25)
    ]
    assert means[1] < 0.97 * means[0] and means[2] < 0.95 * means[1], means


def test_spare_work_helps_the_uncoded_plan():
    code = make_code("uncoded", 6, 120, 1.0, STRAGGLING)
    waiting = simulate_code(code, STRAGGLING, steps=600).mean()
    pulling = simulate_code(code, STRAGGLING, steps=600, spare_work=True).mean()
    assert pulling < 0.9 * waiting


def test_common_random_numbers():
    code = make_code("repetition", 6, 60, 1.2, STRAGGLING)
    a = simulate_code(code, STRAGGLING, steps=50, seed=3)
    np.testing.assert_array_equal(a, simulate_code(code, STRAGGLING, steps=50, seed=3))
    assert not np.array_equal(a, simulate_code(code, STRAGGLING, steps=50, seed=4))
    # A rank's draws do not depend on the other ranks.
    first = task_times(STRAGGLING, 60, 10, seed=3)
    np.testing.assert_array_equal(first[2], task_times([*STRAGGLING[:2], STRAGGLING[2]], 60, 10, seed=3)[2])


def test_compare_codes_reports_each_code_or_why_it_was_skipped():
    rows = compare_codes(STRAGGLING, 60, 1.25, steps=100)
    assert [r["code"] for r in rows] == ["uncoded", "repetition", "frc", "cyclic"]
    assert rows[0]["redundancy"] == 1.0 and rows[1]["redundancy"] == 1.25
    for row in rows[:2]:
        assert row["skipped"] is None
        assert 0 < row["median"] <= row["p95"] and row["mean"] > 0
    for row in rows[2:]:
        assert row["mean"] is None and "integer" in row["skipped"]
    assert rows[1]["mean"] < rows[0]["mean"]
    rows = compare_codes(STRAGGLING, 60, 2.0, codes=("frc", "cyclic"), steps=50)
    assert all(r["skipped"] is None for r in rows)


def test_a_code_that_cannot_decide_is_reported():
    class Broken(RepetitionCode):
        def queue(self, rank):
            return [] if rank == 0 else super().queue(rank)

    code = Broken(3, 9, 1.0)
    with pytest.raises(RuntimeError, match=r"step 0: .*rank 0's 0-2"):
        simulate_code(code, [WorkerProfile(0, 1, 1)] * 3, steps=2)


def test_bad_arguments():
    code = make_code("repetition", 3, 9, 1.5)
    with pytest.raises(CodeError, match="profiles"):
        simulate_code(code, STRAGGLING, steps=2)
    with pytest.raises(CodeError, match="steps"):
        simulate_code(code, STRAGGLING[:3], steps=0)
