"""Training progress reads well where it is written: a bar on a terminal only, one line per epoch always."""

import io
import logging

import pytest
import torch
from ignite.engine import Engine
from ignite.handlers import ProgressBar

from medseg_peft.workflows.handlers import EpochSummary, progress_handlers


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def _run(handlers, opt, epochs=3, steps=4):
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))

    def step(engine, batch):
        opt.step()
        sched.step()
        return [{"loss": torch.tensor(float(batch))}]  # MONAI's decollated trainer output

    engine = Engine(step)
    for handler in handlers:
        handler.attach(engine)
    engine.run(list(range(1, steps + 1)), max_epochs=epochs)


def _optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def test_a_log_file_gets_one_line_per_epoch_and_no_bar(caplog, capsys):
    opt, log_file = _optimizer(), io.StringIO()
    handlers = progress_handlers(opt, stream=log_file)
    assert not any(isinstance(h, ProgressBar) for h in handlers)
    with caplog.at_level(logging.INFO, logger="medseg_peft"):
        _run(handlers, opt)
    assert log_file.getvalue() == "" and capsys.readouterr().err == ""
    lines = [r.getMessage() for r in caplog.records if r.name == "medseg_peft"]
    assert len(lines) == 3 and all(line.startswith(f"epoch {i}/3  loss 2.5000  lr ") for i, line in enumerate(lines, 1))
    # the lr of each epoch's last step: 0.1 / (1 + step) with steps counted from 0 over the run
    assert [float(line.split("lr ")[1].split()[0]) for line in lines] == pytest.approx([0.1 / 4, 0.1 / 8, 0.1 / 12], rel=1e-3)
    assert all(" s (total " in line for line in lines)


def test_a_terminal_gets_the_bar(caplog):
    opt, terminal = _optimizer(), FakeTerminal()
    handlers = progress_handlers(opt, stream=terminal)
    assert [type(h) for h in handlers] == [ProgressBar, EpochSummary]
    with caplog.at_level(logging.INFO, logger="medseg_peft"):
        _run(handlers, opt, epochs=2)
    assert "[2/2]: [4/4] 100%" in terminal.getvalue()
    assert len([r for r in caplog.records if r.name == "medseg_peft"]) == 2


def test_the_bundles_train_handlers_use_them(tmp_path):
    from medseg_peft.workflows.handlers import train_handlers

    opt = _optimizer()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    kinds = [type(h).__name__ for h in train_handlers(sched, None, 1, tmp_path, stream=io.StringIO())]
    assert "EpochSummary" in kinds and "ProgressBar" not in kinds
    kinds = [type(h).__name__ for h in train_handlers(sched, None, 1, tmp_path, stream=FakeTerminal())]
    assert kinds.index("ProgressBar") < kinds.index("EpochSummary")  # the bar closes its line before the epoch's log line
