"""Sharded sampling with torch.distributed (gloo, 2 CPU processes) against one process.

The multi-process tests run this file as a worker script (``python tests/test_distributed.py
SCENARIO OUT``), either under ``torchrun --nproc_per_node 2`` or as two plain processes given the
torchrun environment by hand (so that a failing rank is *not* killed by torchrun and we can see
what the surviving rank reports). Every launch is guarded by a subprocess timeout.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dipuq.samplers.distributed import allreduce_moments, em_hooks, reduce_gamma, sample_distributed, shard_chains
from dipuq.samplers.ranks import DistContext, DistributedError, current_context, init_distributed, main_only
from dipuq.errors import DipuqError, DivergenceError
from dipuq.posterior.linearise import LinearisedModel
from dipuq.operators.base import MatrixOperator
from dipuq.posterior.model import Posterior
from dipuq.samplers import SamplerConfig, make_sampler, run_em
from dipuq.samplers.moments import Moments

HERE = Path(__file__).resolve()
N_CHAINS, SEED = 24, 5
CFG = dict(n_steps=60, chains_per_batch=8)


def tiny_posterior(n: int = 16, ch: int = 6, m: int = 96, noise: float = 0.3, g: float = 3e-4) -> Posterior:
    """Conv net with GroupNorm (p = 420 conv weights) through a random Gaussian A (m = 96 < d = 256)."""
    torch.manual_seed(0)  # the net's initial weights (tests only; library code never seeds globally)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, ch, 3, padding=1), torch.nn.GroupNorm(2, ch), torch.nn.SiLU(),
        torch.nn.Conv2d(ch, ch, 3, padding=1), torch.nn.GroupNorm(2, ch), torch.nn.SiLU(), torch.nn.Conv2d(ch, 1, 1),
    )
    gen = torch.Generator().manual_seed(1)
    d = n * n
    z = torch.randn(1, 1, n, n, generator=gen)
    A = MatrixOperator(torch.randn(m, d, generator=gen) / math.sqrt(d), (n, n), (m,))
    x = torch.zeros(n, n)
    x[n // 4 : 3 * n // 4, n // 4 : 3 * n // 4] = 1.0
    y = A(x) + noise * torch.randn(m, generator=gen)
    return Posterior(LinearisedModel(net, z, A), A, y, sigma2=noise**2, g=g, n_probes=16)


# --------------------------------------------------------------------------------------------
# worker side (runs in the launched processes)
# --------------------------------------------------------------------------------------------
def _worker(scenario: str, out: str) -> None:
    torch.set_num_threads(1)
    timeout = float(os.environ.get("DIPUQ_TEST_TIMEOUT", "30"))
    result: dict = {}
    try:
        with init_distributed(backend="gloo", timeout_s=timeout, device="cpu") as dctx:
            result["rank"], result["world"] = dctx.rank, dctx.world_size
            if scenario == "equal":  # under torchrun; then the "raise" part in the same job
                post = tiny_posterior()
                sampler = make_sampler("sgd", SamplerConfig(**CFG))
                res = sample_distributed(sampler, post, N_CHAINS, seed=SEED, ctx=dctx)
                em = run_em(post, sampler, n_rounds=2, n_samples=8, seed=SEED, **em_hooks(dctx))
                shards = dctx.all_gather_object(res.local_chains)
                value = dctx.on_main(lambda: {"t": torch.arange(3.0), "who": dctx.rank})
                if dctx.is_main:
                    torch.save({"std": res.moments.std(), "n": res.moments.n, "s1": res.moments.s1,
                                "data_fit": res.data_fit, "chains": res.chains, "shards": shards,
                                "g_trace": em.g_trace, "gamma_trace": em.gamma_trace,
                                "on_main": value, "rank_seconds": res.rank_seconds}, out)
                # every rank holds the same reduced moments and EM result
                result["n"], result["g_final"] = res.moments.n, em.g_trace[-1]
                result["on_main_who"] = value["who"]

                def diverge_on_rank_1(st):  # rank 1's share diverges mid-way
                    if dctx.rank == 1 and st.step == 5:
                        result["t_raise"] = time.time()
                        raise DivergenceError("sgd sampler diverged at step 5 (injected)")

                try:  # caught here so that both ranks exit normally and torchrun kills neither
                    sample_distributed(make_sampler("sgd", SamplerConfig(n_steps=20, chains_per_batch=4, grad_tol=0)), post, 8,
                                       seed=SEED, ctx=dctx, callback=diverge_on_rank_1)
                except DistributedError as exc:
                    result["raise_error"], result["raise_type"], result["t_error"] = str(exc), type(exc).__name__, time.time()
            elif scenario in ("die", "hang"):  # rank 1 crashes / stops responding before the reduce
                mom = Moments((4, 4)).update(torch.ones(2, 4, 4))
                if dctx.rank == 1:
                    if scenario == "die":
                        os._exit(3)
                    time.sleep(60)
                result["t_reduce"] = time.time()
                allreduce_moments(mom, dctx)
            elif scenario == "main":  # rank 0 works longer than the collective timeout, then fails
                result["slow"] = dctx.on_main(lambda: (time.sleep(1.5 * timeout), 42)[1])

                def bad_scan():
                    raise DipuqError("projections contain NaN (injected)")

                dctx.on_main(bad_scan)
    except Exception as exc:  # noqa: BLE001 - report what this rank saw
        result["error"], result["type"], result["t_error"] = str(exc), type(exc).__name__, time.time()
        _report(out, result)
        sys.exit(1)
    _report(out, result)


def _report(out: str, result: dict) -> None:
    """Each rank writes its own JSON file (ranks share one stdout under torchrun)."""
    Path(f"{out}.rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(result))


def _results(out: Path, world: int = 2) -> list[dict | None]:
    files = [Path(f"{out}.rank{r}.json") for r in range(world)]
    return [json.loads(f.read_text()) if f.exists() else None for f in files]


# --------------------------------------------------------------------------------------------
# test side
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", **{k: str(v) for k, v in extra.items()})
    return env


def _launch_by_hand(scenario: str, tmp_path: Path, timeout: float, guard: float = 90.0,
                    only_rank0: bool = False) -> list[tuple]:
    """Two plain processes with the torchrun environment; returns (rc, result, seconds) per rank.

    ``only_rank0``: collect rank 0 and kill rank 1 (a rank simulating a hang).
    """
    port = _free_port()
    procs, t0 = [], time.monotonic()
    for r in range(2):
        env = _env(WORLD_SIZE=2, RANK=r, LOCAL_RANK=r, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   DIPUQ_TEST_TIMEOUT=timeout)
        procs.append(subprocess.Popen([sys.executable, str(HERE), scenario, str(tmp_path / "out.pt")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    out = []
    try:
        for p in procs[:1] if only_rank0 else procs:
            text, _ = p.communicate(timeout=guard)  # the guard: a hang fails the test instead of CI
            res = _results(tmp_path / "out.pt")[len(out)]
            out.append((p.returncode, res or {"output": text[-2000:]}, time.monotonic() - t0))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def test_shards_cover_every_chain_exactly_once():
    for n in (0, 1, 5, 24, 101):
        for w in (1, 2, 3, 7):
            shards = [shard_chains(n, r, w) for r in range(w)]
            flat = sorted(k for s in shards for k in s)
            assert flat == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shard_chains([10, 11, 12, 13, 14], 1, 2) == [11, 13]
    with pytest.raises(DipuqError, match="outside"):
        shard_chains(4, 2, 2)


def test_single_process_is_a_no_op(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with init_distributed(device="cpu") as dctx:
        assert (dctx.rank, dctx.world_size, dctx.is_main, dctx.is_distributed) == (0, 1, True, False)
        assert current_context() is dctx
        assert dctx.broadcast_object({"a": 1}) == {"a": 1} and dctx.on_main(lambda: 7) == 7
        assert em_hooks(dctx) == {}
        t = torch.ones(3)
        assert dctx.all_reduce_(t) is t and t.tolist() == [1.0, 1.0, 1.0]
        calls = []
        assert main_only(lambda: calls.append(1) or "wrote")() == "wrote" and calls == [1]
        assert reduce_gamma(torch.tensor([1.0, 3.0]), dctx) == 2.0
        post = tiny_posterior()
        sampler = make_sampler("sgd", SamplerConfig(**CFG))
        res = sample_distributed(sampler, post, 10, seed=SEED, ctx=dctx)
        ref = sampler.sample(post, 10, seed=SEED)
        # one process: the same batches in the same order, so bit-identical
        assert torch.equal(res.moments.s2, ref.moments.s2) and torch.equal(res.data_fit, ref.data_fit.double())
    assert current_context() is not dctx  # shutdown forgets it
    # on a non-main rank main_only does nothing
    assert DistContext(rank=1, world_size=2).main_only(lambda: 1) is None


def test_launch_errors_are_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(DistributedError, match="MASTER_ADDR/MASTER_PORT are not set"):
        init_distributed(device="cpu")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(DistributedError, match="RANK='x' is not an integer"):
        init_distributed(device="cpu")
    with pytest.raises(DipuqError, match="timeouts must be positive"):
        init_distributed(timeout_s=0)


@pytest.fixture(scope="module")
def torchrun_job(tmp_path_factory):
    """One ``torchrun --nproc_per_node 2`` job (gloo): the sharded run, then a share that fails."""
    out = tmp_path_factory.mktemp("torchrun") / "out.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(HERE), "equal", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out), _results(out)


def test_two_ranks_match_one_process(torchrun_job):
    """Same std map, data-fit terms and EM trace as one process with the same seed."""
    got, ranks = torchrun_job
    assert sorted(k for s in got["shards"] for k in s) == list(range(N_CHAINS))
    assert got["shards"][0] == list(range(0, N_CHAINS, 2))  # round-robin
    assert got["on_main"]["who"] == 0 and torch.equal(got["on_main"]["t"], torch.arange(3.0))
    for r in ranks:  # both ranks hold the reduced moments and rank 0's g and on_main value
        assert (r["world"], r["n"], r["g_final"], r["on_main_who"]) == (2, N_CHAINS, got["g_trace"][-1], 0)

    post = tiny_posterior()
    sampler = make_sampler("sgd", SamplerConfig(**CFG))
    ref = sampler.sample(post, N_CHAINS, seed=SEED)
    em = run_em(post, sampler, n_rounds=2, n_samples=8, seed=SEED)
    assert got["n"] == N_CHAINS and got["chains"] == list(range(N_CHAINS))
    # Same chain noise per chain; only rounding may differ: the float64 sums add in another order
    # (measured 2e-16 relative in the std map) and, on BLAS builds whose float32 results depend on
    # the batch's other rows, each sample to a few float32 eps over 60 solver steps (measured 0 here:
    # the per-chain data-fit terms agree bit for bit). 1e-6 admits that and still fails on any real
    # fault: one chain missing, duplicated or drawn with the wrong noise moves the std by ~1/K = 4 %.
    torch.testing.assert_close(got["std"], ref.moments.std(), rtol=1e-6, atol=0)
    torch.testing.assert_close(got["data_fit"], ref.data_fit.double(), rtol=1e-6, atol=0)
    # EM: γ̂ from all 8 chains on both ranks, g from rank 0 (measured bit-identical; same bound)
    torch.testing.assert_close(torch.tensor(got["g_trace"], dtype=torch.float64),
                               torch.tensor(em.g_trace, dtype=torch.float64), rtol=1e-6, atol=0)


def test_a_rank_whose_share_fails_stops_every_rank(torchrun_job):
    _, ranks = torchrun_job
    for r in ranks:
        assert r.get("raise_type") == "DistributedError", r
        assert "failed on 1 of 2 ranks (rank 1: DivergenceError: sgd sampler diverged at step 5" in r["raise_error"]
    # rank 0 learns of it at the agreement step right after its own share (measured 0.2 s after
    # rank 1 raised), not from the 30 s collective timeout; 20 s leaves room for a loaded CI box
    assert ranks[0]["t_error"] - ranks[1]["t_raise"] < 20


@pytest.mark.parametrize("scenario,why", [("die", "crashed, exited or did not respond"),
                                          ("hang", "did not respond within 4 s")])
def test_a_dead_or_hung_rank_gives_a_clear_error_not_a_hang(tmp_path, scenario, why):
    res = _launch_by_hand(scenario, tmp_path, timeout=4, only_rank0=True)
    rc, r, _ = res[0]
    assert rc == 1 and r["type"] == "DistributedError" and why in r["error"], r
    assert "rank 0 of 2" in r["error"]
    waited = r["t_error"] - r["t_reduce"]
    # crash: the peer's socket closes (measured 0.01 s); hang: the 4 s gloo timeout (measured 4.0 s)
    assert waited < 2 if scenario == "die" else 3.9 < waited < 15


def test_waiting_for_rank_0_outlasts_the_collective_timeout_and_sees_its_failure(tmp_path):
    res = _launch_by_hand("main", tmp_path, timeout=2)
    (rc0, r0, _), (rc1, r1, _) = res
    assert r1["slow"] == 42  # rank 1 waited 3 s > the 2 s collective timeout for rank 0's value
    assert rc0 == 1 and r0["type"] == "DipuqError" and "projections contain NaN" in r0["error"]
    assert rc1 == 1 and r1["type"] == "DistributedError", r1
    assert "rank 0" in r1["error"] and "DipuqError: projections contain NaN (injected)" in r1["error"]


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
