"""Resuming FSDP2 state saved by 2 ranks (real processes, gloo on CPU): on 2 ranks bitwise with identical losses, on 3
ranks with the full state exactly the saved one; all ranks agree before any touches its model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sharded_workers import run

import resumer
from resumer.formats.native.manifest import MANIFEST

pytestmark = pytest.mark.slow


def _save(tmp_path: Path, step: int = 1) -> tuple[str, list[dict], dict]:
    root = str(tmp_path / "ckpts")
    out = tmp_path / f"save{step}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAVE_STEP", str(step))
        reports = run(2, root, "save", str(out))
    assert all("error" not in r for r in reports), reports
    return root, reports, torch.load(out / "state.pt")


@pytest.fixture(scope="module")
def step1(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict], dict]:
    """One 2-rank save of step 1 (the default model and optimizer), shared by the tests that only read it: each
    resumes into its own output folder, and none damages, marks or adds a checkpoint (a resume's lease is gone when it
    ends)."""
    return _save(tmp_path_factory.mktemp("step1"))


def _same(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for param, state in a["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"][param][key]), (param, key)


def test_two_ranks_resume_two_ranks_bitwise_with_identical_losses(tmp_path, step1):
    root, saved_reports, saved = step1
    reports = run(2, saved_reports[0]["uri"], "resume", str(tmp_path / "resume"))
    assert [r.get("step") for r in reports] == [1, 1]
    _same(saved, torch.load(tmp_path / "resume" / "state.pt"))
    assert reports[0]["losses"] == saved_reports[0]["losses"]  # the next steps are those of the uninterrupted run
    assert [r["draws"] for r in reports] == [r["draws"] for r in saved_reports]  # each rank's own RNG stream
    assert reports[0]["draws"] != reports[1]["draws"]


def test_save_and_resume_after_an_evaluation_pass_keep_the_sharded_state_exactly(tmp_path, step1, monkeypatch):
    # After a forward pass with no backward (an evaluation between steps), FSDP2 leaves a module that does not reshard
    # after forward (and the root module) holding full, unsharded parameters, not the DTensors the optimizer steps.
    # Read then, the save failed ("the optimizer holds a parameter that is not in the model") and so did the resume,
    # and a resume of the model alone failed inside torch's load_state_dict after copying some tensors in.
    monkeypatch.setenv("EVALUATED", "1")  # the last Linear keeps its full parameters after an evaluation pass
    root, saved_reports, saved = _save(tmp_path)  # saved right after an evaluation pass
    reports = run(2, saved_reports[0]["uri"], "resume", str(tmp_path / "resume"))  # resumed right after one
    assert [r.get("error") for r in reports] == [None, None]
    assert [r.get("step") for r in reports] == [1, 1]
    _, plain_reports, plain = step1  # the same training, saved and resumed with no evaluation pass
    _same(plain, saved)
    _same(plain, torch.load(tmp_path / "resume" / "state.pt"))
    assert reports[0]["losses"] == saved_reports[0]["losses"] == plain_reports[0]["losses"]


def test_resuming_into_an_optimizer_without_state_takes_no_step(tmp_path, monkeypatch):
    # A relaunched job's optimizer has no state yet. torch's set_optimizer_state_dict would first run a step at
    # learning rate 0 to create some, which moves the parameters of an optimizer whose update does not vanish there.
    monkeypatch.setenv("OPTIMIZER", "own-decay")
    root, saved_reports, saved = _save(tmp_path)
    reports = run(2, saved_reports[0]["uri"], "resume", str(tmp_path / "resume"))
    assert [r.get("step") for r in reports] == [1, 1]
    _same(saved, torch.load(tmp_path / "resume" / "state.pt"))
    assert reports[0]["losses"] == saved_reports[0]["losses"]


def test_each_of_two_ranks_reads_about_half_of_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARD_WIDTH", "4096")  # data bytes dominate the headers
    root, saved_reports, saved = _save(tmp_path)
    uri = saved_reports[0]["uri"]
    m = resumer.read_manifest(uri)
    reports = run(2, uri, "resume", str(tmp_path / "resume"))
    _same(saved, torch.load(tmp_path / "resume" / "state.pt"))
    for r in reports:  # only the chunks overlapping its own shards, each checked against its own checksum
        assert r["bytes_read"] <= 0.55 * m.total_bytes, (r["bytes_read"], m.total_bytes)


def test_three_ranks_resume_the_full_saved_state_exactly(tmp_path, step1):
    root, saved_reports, saved = step1
    reports = run(3, saved_reports[0]["uri"], "resume", str(tmp_path / "resume"))
    assert [r.get("step") for r in reports] == [1, 1, 1]
    _same(saved, torch.load(tmp_path / "resume" / "state.pt"))  # as DTensor.full_tensor() gathers it


@pytest.mark.parametrize(("scenario", "injected"), [
    ("resume-one-rank-fails", "could not read its bytes (injected)"),
    # Laying the read state out like the live shards can fail too (it did inside torch's set_model_state_dict): that
    # is done before the ranks agree, so it is every rank's refusal, not one rank's half-applied commit.
    ("resume-one-rank-cannot-place", "cannot place its shard (injected)"),
])
def test_one_rank_refusing_makes_every_rank_refuse_with_nothing_changed(tmp_path, step1, scenario, injected):
    root, saved_reports, _ = step1
    reports = run(2, saved_reports[0]["uri"], scenario, str(tmp_path / "resume"))
    errors = {r.get("error") for r in reports}
    assert len(errors) == 1 and None not in errors, errors  # the same CheckpointError on every rank
    (error,) = errors
    assert injected in error and "found by rank 1 of 2" in error
    assert all(r["unchanged"] for r in reports)  # rank 0 read and checked everything, and still changed nothing


def test_a_damaged_rank_file_is_refused_by_every_rank_and_the_root_falls_back_together(tmp_path):
    _save(tmp_path, 1)
    root, saved_reports, _ = _save(tmp_path, 2)
    newest = Path(saved_reports[0]["uri"])
    (rank1,) = newest.glob("model.*.rank1.safetensors")
    data = bytearray(rank1.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern in rank 1's last tensor bytes
    rank1.write_bytes(bytes(data))

    reports = run(2, str(newest), "resume", str(tmp_path / "direct"))
    errors = {r.get("error") for r in reports}
    assert len(errors) == 1 and None not in errors and "fails its checksum" in next(iter(errors)), errors
    assert all(r["unchanged"] for r in reports)

    reports = run(2, root, "resume", str(tmp_path / "from-root"))
    assert [r.get("step") for r in reports] == [1, 1]  # every rank passed over step 2 and took step 1


def test_ranks_that_chose_different_checkpoints_from_a_root_choose_again_together(tmp_path, monkeypatch):
    """Step 2 commits after rank 0 listed the root and before rank 1 did: rank 0 chose step 1, rank 1 step 2. Their
    plans differ, so no rank loads; both choose again, both take step 2, and the state is step 2's exactly."""
    _save(tmp_path, 1)
    root, saved_reports, saved = _save(tmp_path, 2)
    manifest = Path(saved_reports[0]["uri"]) / MANIFEST
    held = tmp_path / "held-manifest.json"
    manifest.rename(held)  # step 2 is not committed yet
    monkeypatch.setenv("HELD_MANIFEST", str(held))
    monkeypatch.setenv("COMMIT_TO", str(manifest))
    reports = run(2, root, "resume-listing-race", str(tmp_path / "resume"))
    assert [r["chose"] for r in reports] == [["step-0000000001", "step-0000000002"], ["step-0000000002"] * 2]
    assert [r.get("step") for r in reports] == [2, 2], reports
    _same(saved, torch.load(tmp_path / "resume" / "state.pt"))
    assert not any((Path(root) / step / "quarantine.json").exists() for step in ("step-0000000001",
                                                                                "step-0000000002"))


def test_ranks_whose_models_differ_all_refuse_and_none_changes(tmp_path, step1):
    """Rank 1's model has a layer rank 0's lacks: its plan differs (and is refused under strict). Every rank raises
    RanksDiverged naming both plans, and no rank's model changed (before, rank 0 would load while rank 1 refused)."""
    _, saved_reports, _ = step1
    reports = run(2, saved_reports[0]["uri"], "resume-models-differ", str(tmp_path / "resume"))
    assert [r.get("error_type") for r in reports] == ["RanksDiverged"] * 2, reports
    assert len({r["error"] for r in reports}) == 1
    assert "rank 0: " in reports[0]["error"] and "rank 1: " in reports[0]["error"]
    assert [r["unchanged"] for r in reports] == [True, True]


def test_one_rank_that_cannot_open_the_checkpoint_stops_every_rank_at_once(tmp_path, step1):
    """Rank 1's storage refuses it before it has planned: it raises its error, and rank 0 (which opened and planned)
    raises one naming rank 1's, of the same kind, instead of waiting for rank 1 in the agreement until the process
    group times out. Neither model changed."""
    root, _, _ = step1
    reports = run(2, root, "resume-one-rank-cannot-open", str(tmp_path / "resume"))
    assert [r.get("error_type") for r in reports] == ["TransientStorageError"] * 2, reports
    assert reports[1]["error"] == "the storage refused rank 1 (injected)"
    assert reports[0]["error"].startswith("Rank 1 of 2 could not open and plan the checkpoint (TransientStorageError: "
                                          "the storage refused rank 1 (injected))")
    assert [r["unchanged"] for r in reports] == [True, True]


def test_a_one_process_checkpoint_resumes_into_two_fsdp2_ranks_exactly(tmp_path):
    from sharded_workers import build, train_step

    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    train_step(model, opt, 1)
    uri = resumer.save_checkpoint(str(tmp_path / "ckpts"), 1, model, opt)
    assert not resumer.read_manifest(uri).sharded
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()},
             "optimizer": {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}}
    reports = run(2, uri, "resume", str(tmp_path / "resume"))
    assert [r.get("step") for r in reports] == [1, 1]
    _same(saved, torch.load(tmp_path / "resume" / "state.pt"))


def test_renames_auto_carries_sharded_state_past_an_inserted_parameterless_layer(tmp_path, step1):
    root, saved_reports, saved = step1
    reports = run(2, saved_reports[0]["uri"], "resume-renamed", str(tmp_path / "resume"))
    assert [r.get("step") for r in reports] == [1, 1], reports
    got = torch.load(tmp_path / "resume" / "state.pt")
    moved = {"0.weight": "0.weight", "0.bias": "0.bias", "2.weight": "3.weight", "2.bias": "3.bias", "scale": "scale"}
    for old, new in moved.items():
        assert torch.equal(saved["model"][old], got["model"][new]), old
        for key, value in saved["optimizer"].get(old, {}).items():
            assert torch.equal(value, got["optimizer"][new][key]), (old, key)


def _planned_alike(reports: list[dict]) -> None:
    assert all(r["plan_ok"] for r in reports), reports
    assert len({r["digest"] for r in reports}) == 1, reports  # every rank planned the same resume


def test_two_fsdp2_ranks_resume_into_two_ddp_ranks_exactly_with_the_same_losses(tmp_path, step1):
    root, saved_reports, saved = step1
    reports = run(2, saved_reports[0]["uri"], "ddp-resume", str(tmp_path / "resume"))
    _planned_alike(reports)
    assert [r.get("step") for r in reports] == [1, 1], reports
    for rank in (0, 1):  # each DDP rank holds the whole state, exactly the sharded one
        _same(saved, torch.load(tmp_path / "resume" / f"state{rank}.pt"))
    assert [r["draws"] for r in reports] == [r["draws"] for r in saved_reports]  # each rank's own RNG stream
    # The next steps are those of the uninterrupted FSDP2 run, exactly: both ranks see the same batch, so DDP's
    # all-reduce and FSDP2's reduce-scatter average two equal gradients, which is exact in either order.
    assert [r["losses"] for r in reports] == [saved_reports[0]["losses"]] * 2


def test_two_ddp_ranks_checkpoint_resumes_into_two_fsdp2_ranks_exactly(tmp_path):
    saved_reports = run(2, str(tmp_path / "ckpts"), "ddp-save", str(tmp_path / "save"))
    assert all("error" not in r for r in saved_reports), saved_reports
    (uri,) = {r["uri"] for r in saved_reports}
    assert uri is not None and not resumer.read_manifest(uri).sharded  # replicated state, written once by rank 0
    saved = torch.load(tmp_path / "save" / "state0.pt")
    _same(saved, torch.load(tmp_path / "save" / "state1.pt"))  # the DDP ranks held the same state

    reports = run(2, uri, "fsdp2-resume-planned", str(tmp_path / "resume"))
    _planned_alike(reports)
    assert [r.get("step") for r in reports] == [1, 1], reports
    _same(saved, torch.load(tmp_path / "resume" / "state0.pt"))  # as DTensor.full_tensor() gathers it
    assert [r["draws"] for r in reports] == [saved_reports[0]["draws"]] * 2  # replicated: rank 0's RNG on each
    assert [r["losses"] for r in reports] == [saved_reports[0]["losses"]] * 2  # exact, as in the other direction


@pytest.mark.parametrize(("scenario", "error_type", "fragment"), [
    ("ddp-resume-one-rank-fails", "CheckpointError", "rank 1 could not read its bytes (injected)"),
    ("ddp-resume-split-plan", "CheckpointMismatch", "differently from the controller"),
])
def test_ddp_ranks_agree_one_ranks_refusal_is_every_ranks_and_no_model_changes(tmp_path, step1, scenario, error_type,
                                                                               fragment):
    """Replicated (DDP) state: a resume is collective too. One rank failing to read, or planning differently
    from what it was told, makes every rank refuse with the same error, and no rank's model changes."""
    root, saved_reports, saved = step1
    reports = run(2, saved_reports[0]["uri"], scenario, str(tmp_path / "resume"))
    errors = {r.get("error") for r in reports}
    assert len(errors) == 1 and None not in errors, reports  # the same text on every rank
    (error,) = errors
    assert fragment in error and "found by rank 1 of 2; every rank refused, none changed its model" in error
    assert [r["error_type"] for r in reports] == [error_type] * 2
    assert [r["unchanged"] for r in reports] == [True, True]

