"""Trainer callbacks: a progress bar with loss and ETA, and the run's metrics JSON + loss plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


class ProgressBar(TrainerCallback):
    """Steps, loss, learning rate and ETA on one line (replaces Trainer's dict printing)."""

    def __init__(self, description: str = "train") -> None:
        self.description = description
        self.bar: tqdm | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc=self.description, unit="step"
            )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict | None = None,
        **_: Any,
    ) -> None:
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsRecorder(TrainerCallback):
    """Keeps every logged value; `write` saves metrics.json and a loss-curve PNG."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        """A resumed run keeps the history its checkpoint recorded, so metrics.json covers every step."""
        if state.is_world_process_zero and not self.history:
            self.history = [{"step": row.get("step"), **row} for row in state.log_history]

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict | None = None,
        **_: Any,
    ) -> None:
        if state.is_world_process_zero and logs:
            self.history.append({"step": state.global_step, **logs})

    def write(self, out_dir: Path, extra: dict[str, Any]) -> None:
        losses = [(row["step"], row["loss"]) for row in self.history if "loss" in row]
        (out_dir / "metrics.json").write_text(json.dumps({**extra, "history": self.history}, indent=2))
        if losses:
            plot_loss(losses, out_dir / "loss.png")


def plot_loss(points: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot([p[0] for p in points], [p[1] for p in points], linewidth=1.5)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
