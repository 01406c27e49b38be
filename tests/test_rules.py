"""Choosing rules against brute force, and the Selection type's own contract."""

import pytest
import torch

from medseg_peft.selection import Entries, Selection, global_top, topk_per_row


def brute_topk_rows(score, k):
    rows = score.reshape(score.shape[0], -1).tolist()
    # highest score first; on ties the lower column wins
    return [sorted(sorted(range(len(r)), key=lambda c: (-r[c], c))[:k]) for r in rows]


@pytest.mark.parametrize("shape,k", [((7, 5), 1), ((7, 5), 3), ((4, 3, 2, 2), 2), ((3, 9), 9)])
def test_topk_per_row_matches_brute_force(shape, k):
    score = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    e = topk_per_row(score, k)
    assert e.layout == "rows" and e.index.shape == (shape[0], k)
    assert e.index.tolist() == brute_topk_rows(score, k)
    assert e.count == shape[0] * k
    assert int(e.mask().sum()) == shape[0] * k and e.mask().shape == shape


def test_topk_ties_break_to_lower_index():
    score = torch.tensor([[1.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    assert topk_per_row(score, 2).index.tolist() == [[1, 2], [0, 1]]


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_topk_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        topk_per_row(torch.randn(3, 4), k)


def test_rows_shorter_than_k_are_taken_whole():
    e = topk_per_row(torch.randn(3, 4), 5, "w")
    assert e.layout == "whole" and e.count == 12


def test_global_top_matches_brute_force():
    g = torch.Generator().manual_seed(4)
    scores = {"a": torch.randn(5, 4, generator=g), "b": torch.randn(7, generator=g), "c": torch.randn(2, 3, generator=g)}
    n = 9
    flat = [(float(v), name, i) for name, s in scores.items() for i, v in enumerate(s.reshape(-1).tolist())]
    order = {name: j for j, name in enumerate(scores)}
    best = sorted(flat, key=lambda t: (-t[0], order[t[1]], t[2]))[:n]
    chosen = global_top(scores, n)
    assert sum(e.count for e in chosen.values()) == n
    want = {}
    for _, name, i in best:
        want.setdefault(name, []).append(i)
    assert {name: e.index.tolist() for name, e in chosen.items()} == {name: sorted(v) for name, v in want.items()}


def test_global_top_ties_are_deterministic():
    scores = {"a": torch.ones(4), "b": torch.ones(4)}
    chosen = global_top(scores, 5)
    assert chosen["a"].index.tolist() == [0, 1, 2, 3] and chosen["b"].index.tolist() == [0]


def test_global_top_rejects_bad_budget():
    with pytest.raises(ValueError, match="larger than the 3 eligible"):
        global_top({"a": torch.randn(3)}, 4)
    with pytest.raises(ValueError, match="positive integer"):
        global_top({"a": torch.randn(3)}, 0)


def test_entries_validate_their_index():
    with pytest.raises(ValueError, match="out of range"):
        Entries("rows", (3, 4), torch.tensor([[0], [1], [4]]))
    with pytest.raises(ValueError, match=r"must be \[3, K\]"):
        Entries("rows", (3, 4), torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="unknown layout"):
        Entries("diagonal", (3, 4))


def test_selection_save_load_round_trip(tmp_path):
    sel = Selection(
        {
            "w": topk_per_row(torch.randn(300, 200), 2),
            "v": Entries("flat", (10,), torch.tensor([1, 5, 9])),
            "b": Entries("whole", (6,)),
        },
        total_params=70_000,
        method="test",
        hparams={"k": 2},
    )
    path = sel.save(tmp_path / "sel.safetensors")
    back = Selection.load(path)
    assert back.method == "test" and back.hparams == {"k": 2} and back.total_params == 70_000
    assert list(back) == list(sel)
    for name in sel:
        assert back[name].layout == sel[name].layout and back[name].shape == sel[name].shape
        assert torch.equal(back[name].mask(), sel[name].mask())
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("w.index").dtype == torch.int16  # columns < 32768
        assert f.get_tensor("v.index").dtype == torch.int8
    text = sel.summary()
    assert "top-2/row" in text and "whole" in text and f"{sel.num_trainable:,}" in text
    assert sel.num_trainable == 300 * 2 + 3 + 6


def test_selection_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="without medseg_peft metadata"):
        Selection.load(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        Selection.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        Selection.load(tmp_path / "junk.safetensors")


def test_topk_with_ties_only_in_some_rows_matches_brute_force():
    g = torch.Generator().manual_seed(5)
    score = torch.randint(0, 4, (50, 12), generator=g).float()  # many ties at the boundary
    score[::3] = torch.randn(17, 12, generator=g)  # some rows without ties
    for k in (1, 2, 5):
        assert topk_per_row(score, k).index.tolist() == brute_topk_rows(score, k)
