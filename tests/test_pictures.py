"""The run's pictures (selection map, training curve, contour sheet with legend) and its cost in metrics.json."""

import json

import pytest
import torch
from ignite.engine import Engine, Events
from PIL import Image

import medseg_peft as mp
from medseg_peft.workflows.charts import new_figure
from medseg_peft.workflows.contour_sheet import contour_figure, contour_sheet, draw_tile, predictions, tile_dice
from medseg_peft.workflows.metrics import per_image_scores
from medseg_peft.workflows.pictures import (
    base_numels,
    block_label,
    curve_series,
    draw_selection,
    draw_training_curve,
    kind_of,
    part_of,
    selection_figure,
    selection_from_flags,
    selection_table,
    training_curve_figure,
)
from medseg_peft.workflows.report import RunReport


def _png(path):
    """The picture at ``path`` opens as a PNG of a readable size, and no temporary file is left beside it."""
    assert path.is_file() and path.stat().st_size > 0
    assert not list(path.parent.glob(f".{path.name}.*"))
    with Image.open(path) as image:
        assert image.format == "PNG" and 200 <= image.width <= 4000 and 200 <= image.height <= 4000
        return image.size


def _texts(figure) -> list[str]:
    """Every text the figure shows: titles, tick labels, legend entries and titles, free texts."""
    from matplotlib.text import Text

    figure.canvas.draw()  # tick labels exist once laid out
    return [t.get_text() for t in figure.findobj(Text) if t.get_text() and t.get_visible()]


def _legend(ax_or_figure) -> list[str]:
    legend = ax_or_figure.get_legend() if hasattr(ax_or_figure, "get_legend") else ax_or_figure.legends[0]
    return [t.get_text() for t in legend.get_texts()]


def test_parameter_kinds_and_parts():
    assert [kind_of(f"image_encoder.blocks.3.{n}") for n in ("attn.qkv.weight", "attn.rel_pos_h", "mlp.lin1.weight", "mlp.lin1.bias",
                                                              "norm1.weight", "norm2.bias")] == ["attention", "attention", "mlp", "bias", "norm", "norm"]
    assert kind_of("blocks.0.ls1.gamma") == "other"
    assert part_of("sam.mask_decoder.output_upscaling.0.weight", "sam.image_encoder.") == "mask_decoder"
    assert part_of("sam.image_encoder.neck.0.weight", "sam.image_encoder.") == "image_encoder.neck"
    assert part_of("head.weight", "") == "head"


def test_selection_picture_of_fps_on_tiny_sam(sam, sam_batches, tmp_path):
    selection = mp.FPS(k=2).select(sam, sam_batches)
    numels = base_numels(sam)
    table = selection_table(selection, numels)
    assert table["blocks"] == [(-1, 0), (-1, 1)]  # (stage, block): SAM ViT has no stages
    assert sum(t for t, _ in table["groups"].values()) == selection.num_trainable
    assert sum(n for _, n in table["groups"].values()) == sum(p.numel() for p in sam.parameters())
    assert table["groups"]["mask_decoder"][0] > 0 and "prompt_encoder" in table["groups"]
    assert table["cells"][(-1, 0), "attention"][0] == selection["image_encoder.blocks.0.attn.qkv.weight"].count + selection["image_encoder.blocks.0.attn.proj.weight"].count
    figure = selection_figure(selection, numels)
    heat, bars = figure.axes[:2]
    assert [t.get_text() for t in heat.get_yticklabels()] == [block_label(b) for b in table["blocks"]]
    assert [t.get_text() for t in heat.get_xticklabels()] == table["kinds"]
    assert [t.get_text() for t in bars.get_yticklabels()] == list(table["groups"])
    assert [round(p.get_width()) for p in bars.patches] == [t for t, _ in table["groups"].values()]
    texts = _texts(figure)
    assert f"trainable {selection.num_trainable:,} of {selection.total_params:,}" in figure.get_suptitle()
    trained, total = table["groups"]["mask_decoder"]
    assert any(t.startswith(f"{trained:,} of {total:,} (") for t in texts)  # each part's count, written beside its bar
    _png(draw_selection(selection, tmp_path / "selection.png", numels))


def test_selection_picture_of_lora_on_tiny_vit(vit, tmp_path):
    total = sum(p.numel() for p in vit.parameters())
    selection = mp.LoRA(rank=2).select(vit)
    mp.attach(vit, selection)
    numels = base_numels(vit)  # attached: parametrized originals under their base names, no branch factors
    assert sum(numels.values()) == total and "head.weight" in numels
    table = selection_table(selection, numels)
    assert all(table["cells"][b, "attention"][0] > 0 and table["cells"][b, "mlp"][0] == 0 for b in ((-1, 0), (-1, 1)))
    _png(draw_selection(selection, tmp_path / "selection.png", numels))


def test_selection_picture_of_spt_on_tiny_vit(vit, vit_batches, tmp_path):
    """SPT mixes sparse entries, LoRA and adapters, and parametrizes tensors of the model itself (cls_token):
    every base parameter is counted once under its own name."""
    total = sum(p.numel() for p in vit.parameters())
    selection = mp.SPT(budget=2000, rank=2).select(vit, vit_batches)
    mp.attach(vit, selection)
    numels = base_numels(vit)
    assert sum(numels.values()) == total and "cls_token" in numels
    table = selection_table(selection, numels)
    assert sum(t for t, _ in table["groups"].values()) == selection.num_trainable
    assert not any("parametrizations" in g or "peft_branch" in g for g in table["groups"])
    _png(draw_selection(selection, tmp_path / "selection.png", numels))


def test_full_fine_tuning_is_pictured_from_requires_grad(vit, tmp_path):
    vit.head.requires_grad_(False)
    selection = selection_from_flags(vit)
    assert "head.weight" not in selection and "blocks.0.attn.qkv.weight" in selection
    assert selection.num_trainable == sum(p.numel() for p in vit.parameters() if p.requires_grad)
    _png(draw_selection(selection, tmp_path / "selection.png"))


def test_training_curve_from_a_small_history(tmp_path):
    history = [{"epoch": 0, "mDice": 0.3, "mIoU": 0.2}, {"epoch": 1, "mDice": 0.5, "mIoU": 0.4, "train_loss": 0.9},
               {"epoch": 3, "mDice": 0.6, "mIoU": 0.45, "train_loss": 0.6}]
    loss, metrics = curve_series(history, "mDice", [{"epoch": 2, "loss": 0.7}])
    assert loss == {"train loss (mean per epoch)": [(1, 0.9), (2, 0.7), (3, 0.6)]}
    assert list(metrics) == ["mDice", "mIoU"] and metrics["mDice"][0] == (0, 0.3)
    figure = training_curve_figure(history, "mDice", [{"epoch": 2, "loss": 0.7}], title="fps: run")
    top, bottom = figure.axes
    assert figure.get_suptitle() == "fps: run" and top.get_title(loc="left") == "training loss"
    assert "key metric mDice" in bottom.get_title(loc="left") and bottom.get_xlabel() == "epoch"
    assert _legend(top) == list(loss) and _legend(bottom) == ["mDice", "mIoU"]
    plotted = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for ax in (top, bottom) for line in ax.get_lines()}
    assert plotted == {**loss, **metrics}  # every point of the series, nothing else
    empty = training_curve_figure([], "mDice")
    assert "nothing recorded yet" in _texts(empty) and all(not ax.get_lines() for ax in empty.axes)
    path = draw_training_curve(history, tmp_path / "training_curve.png", "mDice")
    _png(path)
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed over the target


def test_run_report_records_loss_cost_and_pictures(vit, tmp_path):
    """A RunReport cycle on ignite engines: the mean training loss per epoch, wall time, peak memory and the
    tuned fraction land in metrics.json; selection.png at attach, training_curve.png after each validation."""
    selection = mp.LoRA(rank=2).select(vit)
    mp.attach(vit, selection)
    trainer = Engine(lambda engine, batch: {"loss": torch.tensor(batch * engine.state.epoch)})
    evaluator = Engine(lambda engine, batch: None)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(mDice=0.1 * trainer.state.epoch, mIoU=0.05))
    trainer.add_event_handler(Events.STARTED, lambda e: evaluator.run([0]))  # as ValidationHandler(exec_at_start)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0]))
    report = RunReport(tmp_path, vit, trainer, key_metric="mDice", method="lora")
    report.attach(evaluator)
    _png(tmp_path / "selection.png")
    trainer.run([1.0, 3.0], max_epochs=2)
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["train_loss"] == [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 4.0}]
    assert [h.get("train_loss") for h in data["history"]] == [None, 2.0, 4.0]
    assert data["wall_time_s"] > 0 and data["wall_time_s"] <= data["seconds"]
    assert data["peak_memory_mib"] > 0 and data["peak_memory_kind"] == "process_max_rss"
    assert data["trainable"] == selection.num_trainable and data["trainable_fraction"] == pytest.approx(selection.fraction)
    _png(tmp_path / "training_curve.png")


def test_run_report_pictures_a_network_without_selection(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
    net[0].requires_grad_(False)
    trainer = Engine(lambda engine, batch: {"loss": torch.tensor(1.0)})
    report = RunReport(tmp_path, net, trainer, method="full")
    report.attach(Engine(lambda engine, batch: None))
    _png(tmp_path / "selection.png")
    assert report.selection().num_trainable == 3 * 2 + 2


def test_tile_dice_by_hand():
    pred = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    true = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert tile_dice(pred, true) == 2 * 3 / (4 + 4)  # TP 3, FP 1, FN 1
    assert tile_dice(torch.zeros(4, 4), torch.zeros(4, 4)) == 1.0  # nothing to find, nothing found
    # two classes: class 1 as above (0.75); class 2 only in the truth (0.0); class 3 nowhere (not counted)
    true2 = true.clone()
    true2[3, 3] = 2
    assert tile_dice(pred, true2, num_classes=3) == pytest.approx((0.75 + 0.0) / 2)
    # the sheet's binary tiles score as the validation metric scores the image, and print that score
    ax = new_figure(2, 2).add_subplot()
    dice = draw_tile(ax, torch.zeros(3, 4, 4), true, pred, 1)
    assert [t.get_text() for t in ax.texts] == [f"Dice {dice:.3f}"]
    assert dice == pytest.approx(float(per_image_scores(pred[None, None].float(), true[None, None].float())["dice"][0]))


class _Circles(torch.nn.Module):
    """Fixed logits: a disc per class, with ``channels`` outputs (1: binary)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        ys, xs = torch.meshgrid(torch.arange(x.shape[-2]), torch.arange(x.shape[-1]), indexing="ij")
        out = torch.full((x.shape[0], self.channels, *x.shape[-2:]), -5.0)
        if self.channels > 1:
            out[:, 0] = 0.0  # background
        for c in range(1 if self.channels > 1 else 0, self.channels):
            out[:, c][:, (ys - 10 - 12 * c) ** 2 + (xs - 20) ** 2 < 60] = 5.0
        return out


def test_contour_sheet_with_a_legend_writes(tmp_path):
    g = torch.Generator().manual_seed(0)
    label = torch.zeros(2, 1, 48, 48)
    label[:, :, 5:15, 15:25] = 1
    label[:, :, 30:40, 15:25] = 2
    binary = [{"image": torch.rand(2, 3, 48, 48, generator=g) * 255, "label": (label > 0).float()}]
    _png(contour_sheet(_Circles(1), binary, tmp_path / "binary.png", torch.device("cpu"), max_images=3))
    tiles = [(image, true, pred) for image, true, pred, _ in predictions(_Circles(1), binary, torch.device("cpu"), 3, "softmax")]
    figure = contour_figure(tiles, 1)
    assert _legend(figure) == ["true outline", "prediction"]
    dice = [t.get_text() for ax in figure.axes for t in ax.texts]
    assert dice == [f"Dice {tile_dice(pred, true):.3f}" for _, true, pred in tiles]  # one score per image, in its corner
    assert all(len(ax.collections) >= 2 for ax in figure.axes[: len(tiles)])  # a true and a predicted outline on each
    organ = [{"image": torch.rand(2, 1, 48, 48, generator=g), "label": label}]
    _png(contour_sheet(_Circles(3), organ, tmp_path / "organ.png", torch.device("cpu"), class_names=["liver", "kidney"]))
    tiles = [(image, true, pred) for image, true, pred, _ in predictions(_Circles(3), organ, torch.device("cpu"), 8, "softmax")]
    figure = contour_figure(tiles, 2, class_names=["liver", "kidney"])
    assert _legend(figure) == ["liver", "kidney", "true outline: solid", "prediction: dashed"]
    assert "mean over the classes" in figure.legends[0].get_title().get_text()
    with pytest.raises(ValueError, match="no images"):
        contour_figure([], 1)


def test_the_best_file_keeps_the_scored_networks_weights(vit, tmp_path):
    """With EMA the scored network is the EMA copy: the best result file holds its deltas, not the raw ones."""
    import copy

    from safetensors.torch import load_file

    mp.attach(vit, mp.LoRA(rank=2).select(vit))
    scored = copy.deepcopy(vit)
    with torch.no_grad():
        for p in mp.trainable_parameters(scored):
            p.fill_(0.5)
    trainer = Engine(lambda engine, batch: {"loss": torch.tensor(1.0)})
    evaluator = Engine(lambda engine, batch: None)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(mDice=0.5))
    trainer.add_event_handler(Events.STARTED, lambda e: evaluator.run([0]))
    report = RunReport(tmp_path, vit, trainer, key_metric="mDice", method="lora", result_network=scored)
    report.attach(evaluator)
    trainer.run([1.0], max_epochs=1)
    saved = load_file(str(tmp_path / "best_delta.safetensors"))
    lora = [k for k in saved if k.endswith("lora_B")]
    assert lora and all(bool((saved[k] == 0.5).all()) for k in lora)  # the scored copy's, not the raw zeros
    assert json.loads((tmp_path / "metrics.json").read_text())["trainable"] == mp.tuning.tuning_state(vit).selection.num_trainable


def test_selection_picture_of_fps_on_tiny_vit_sam_shows_its_stages(tmp_path):
    """TinyViT's blocks are rows per stage (MBConv stage 0, transformer stages 1-3), its patch mergings parts."""
    from medseg_peft.models import sam_segmenter

    net = sam_segmenter("tiny_lite")
    selection = mp.FPS(k=2).select(net, [torch.rand(1, 3, 64, 64) * 255])
    numels = base_numels(net)
    table = selection_table(selection, numels)
    assert table["blocks"] == [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0)]
    assert table["cells"][(0, 0), "conv"][0] > 0 and table["cells"][(2, 1), "attention"][0] > 0
    assert table["cells"][(1, 0), "norm"][0] == 0  # LayerNorms and BatchNorm scales stay frozen
    assert "image_encoder.merge after stage 0" in table["groups"] and "image_encoder.patch_embed" in table["groups"]
    assert sum(t for t, _ in table["groups"].values()) == selection.num_trainable
    _png(draw_selection(selection, tmp_path / "selection.png", numels))
