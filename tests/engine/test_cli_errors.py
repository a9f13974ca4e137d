"""Bad input to `moepager generate` gets one clear line on stderr and a non-zero exit, no traceback."""

import json
import shutil
import subprocess
import sys

import pytest


def _run(*args):
    proc = subprocess.run([sys.executable, "-m", "server.cli", "generate", *args], capture_output=True, text=True,
                          check=False, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def _assert_one_line_error(rc, err, *needles):
    assert rc != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("moepager") or "error" in ln]
    assert lines, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_missing_folder(tmp_path):
    rc, _, err = _run("--model", str(tmp_path / "nope"), "--prompt-ids", "1,2")
    _assert_one_line_error(rc, err, "model folder not found")


def test_missing_shard(tiny_model_dir, tmp_path):
    src = tiny_model_dir("olmoe")
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    (dst / "model.safetensors").rename(dst / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    rc, _, err = _run("--model", str(dst), "--prompt-ids", "1,2")
    _assert_one_line_error(rc, err, "missing shard", "model-00002-of-00002.safetensors")


def test_unsupported_architecture(tiny_model_dir, tmp_path):
    dst = tmp_path / "llama"
    shutil.copytree(tiny_model_dir("olmoe"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "llama"
    (dst / "config.json").write_text(json.dumps(cfg))
    rc, _, err = _run("--model", str(dst), "--prompt-ids", "1,2")
    _assert_one_line_error(rc, err, "unsupported architecture 'llama'", "mixtral", "qwen3_moe", "gpt_oss")


def test_budget_below_top_k(tiny_model_dir):
    rc, _, err = _run("--model", str(tiny_model_dir("olmoe")), "--prompt-ids", "1,2", "--expert-slots", "5")
    _assert_one_line_error(rc, err, "--expert-slots", "minimum of 6")


@pytest.mark.parametrize("flag,value", [("--dtype", "float8"), ("--device", "tpu"), ("--cache-policy", "nope"),
                                        ("--expert-slots", "-3")])
def test_bad_flag_values_name_the_flag(tiny_model_dir, flag, value):
    rc, _, err = _run("--model", str(tiny_model_dir("olmoe")), "--prompt-ids", "1", flag, value)
    _assert_one_line_error(rc, err, flag)


def test_generate_json_is_last_line(tiny_model_dir):
    rc, out, err = _run("--model", str(tiny_model_dir("olmoe")), "--prompt-ids", "5,6,7", "--max-tokens", "6",
                        "--temperature", "0", "--expert-slots", "6", "--json", "--ignore-eos")
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["token_ids"]) == 6
    for key in ("hits", "misses", "hit_rate", "bytes_transferred", "stall_seconds", "tokens_per_second"):
        assert key in result["stats"]
    assert result["stats"]["hits"] + result["stats"]["misses"] > 0


def test_unknown_expert_dtype():
    rc, _, err = _run("--expert-dtype", "int3", "--prompt-ids", "1,2")
    _assert_one_line_error(rc, err, "--expert-dtype", "int3")


def test_unknown_dense_dtype():
    rc, _, err = _run("--dense-dtype", "int4", "--prompt-ids", "1,2")
    _assert_one_line_error(rc, err, "--dense-dtype", "int4")


def test_int4_group_size_that_does_not_divide(tmp_path):
    # The embedded model: hidden 256, expert intermediate 96; 48 is no multiple of 32 and 128 does not divide 96.
    rc, _, err = _run("--expert-dtype", "int4", "--int4-group-size", "48", "--quant-cache-dir", str(tmp_path),
                      "--prompt-ids", "1,2")
    _assert_one_line_error(rc, err, "--int4-group-size", "48")
    rc, _, err = _run("--expert-dtype", "int4", "--int4-group-size", "128", "--quant-cache-dir", str(tmp_path),
                      "--prompt-ids", "1,2")
    _assert_one_line_error(rc, err, "--int4-group-size", "128", "intermediate 96")
