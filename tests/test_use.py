"""Using what was trained: text from the GPT, a classifier's validation accuracy (real runs, real CLI)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.extended
def test_sample_text_from_a_trained_gpt_and_evaluate_a_classifier(cli):
    gpt = cli(
        "train", "debug=smoke", "trainer.max_steps=3", "model.n_layer=1", "model.n_embd=32", "model.n_head=2"
    )
    assert gpt.returncode == 0, gpt.output
    (gpt_run,) = gpt.run_dirs("runs/debug")
    first, again = (
        cli("sample", str(gpt_run), "--prompt", "def ", "--tokens", "24", "--seed", "3") for _ in range(2)
    )
    assert first.returncode == 0, first.output
    assert first.stdout.startswith("def ") and len(first.stdout.encode()) >= 24
    assert again.stdout == first.stdout  # the same seed, the same text
    other = cli("sample", str(gpt_run), "--prompt", "def ", "--tokens", "24", "--seed", "4")
    assert other.returncode == 0 and other.stdout != first.stdout

    mlp = cli("train", "experiment=digits_mlp", "trainer.max_steps=60", "run.name=digits")
    assert mlp.returncode == 0, mlp.output
    run = mlp.cwd / "runs" / "digits"
    result = cli("evaluate", str(run))
    assert result.returncode == 0, result.output
    (line,) = result.stdout.strip().splitlines()
    metrics = dict(zip(line.split()[1::2], map(float, line.split()[2::2]), strict=True))
    assert metrics["val/acc"] > 0.8  # after 60 steps the MLP knows its digits
    summary_val_loss = float(mlp.stdout.split("val/loss ")[1].split()[0])  # the run's own last validation
    assert metrics["val/loss"] == pytest.approx(summary_val_loss, abs=1e-3)
    refused = cli("sample", str(run))
    assert (
        refused.returncode == 2
        and refused.stderr.startswith("error: ")
        and "trainer evaluate" in refused.stderr
    )
