"""The published recipes as launch scripts (printed, not run: they need ImageNet and 16-64 GPUs) and
the hostfile check they run first."""

from __future__ import annotations

import os
import subprocess

import pytest
from helpers import BIN, REPO

from moco_scale.commands.hostfile import HostfileError, parse_hostfile


def recipe(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(REPO / "scripts" / "recipes" / name), *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)


@pytest.mark.parametrize("text, message", [
    ("node-a slot=8\n", "line 1: 'node-a slot=8' is not 'HOST slots=N'"),
    ("# two hosts\nnode-a slots=8\nnode-b slots=0\n", "line 3: node-b has slots=0"),
    ("node-a slots=8\nnode-a slots=8\n", "line 2: node-a is listed twice"),
    ("# nothing\n\n", "lists no host"),
])
def test_bad_hostfiles_name_the_line(tmp_path, text, message):
    (tmp_path / "hf").write_text(text)
    with pytest.raises(HostfileError, match=message):
        parse_hostfile(str(tmp_path / "hf"))


def test_shipped_hostfiles_parse():
    assert parse_hostfile(str(REPO / "hostfiles" / "localhost")) == [("localhost", 8)]
    example = (REPO / "hostfiles" / "two_nodes.example").read_text()
    hosts = "\n".join(line.removeprefix("# ") for line in example.splitlines() if " slots=" in line)
    assert len(hosts.splitlines()) == 2


@pytest.mark.parametrize("name, flags, engine, nodes", [
    ("r50_100ep.sh", "-a resnet50 -b 4096 --optimizer lars --lr 0.6 --wd 1e-6 --epochs 100 --warmup-epochs 10 "
                     "--moco-m 0.99 --moco-m-cos --moco-t 1.0 --crop-min 0.2", "ddp.json", 2),
    ("r50_1000ep.sh", "--lr 0.3 --wd 1.5e-6 --epochs 1000 --warmup-epochs 10 --moco-m 0.996", "ddp.json", 2),
    ("vit_base_4096.sh", "-a vit_base -b 4096 --optimizer adamw --lr 1.5e-4 --wd 0.1 --epochs 300 --warmup-epochs 40 "
                         "--moco-m 0.99 --moco-m-cos --moco-t 0.2 --stop-grad-conv1 --crop-min 0.08", "zero3.json", 8),
])
def test_recipe_prints_the_papers_flags(tmp_path, name, flags, engine, nodes):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"node{i} slots=8\n" for i in range(nodes)))
    res = recipe(name, "/data/imagenet", str(hostfile), "--print-freq", "50")
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith(f"launching: deepspeed --hostfile {hostfile} --master_addr node0 ")
    assert f" {flags} " in line and f"ds_configs/{engine}" in line and line.endswith("--print-freq 50")
    assert "published for" not in res.stderr  # the node count matches


def test_recipe_stops_on_a_bad_hostfile_and_notes_another_node_count(tmp_path):
    (tmp_path / "bad").write_text("node0 slots=0\n")
    res = recipe("vit_small_4096.sh", "/data", str(tmp_path / "bad"))
    assert res.returncode != 0 and "slots=0" in res.stderr and "launching" not in res.stdout
    (tmp_path / "one").write_text("node0 slots=8\n")
    res = recipe("vit_small_4096.sh", "/data", str(tmp_path / "one"))
    assert res.returncode == 0 and "published for 4 node(s)" in res.stderr
    assert recipe("vit_small_4096.sh").returncode == 2
