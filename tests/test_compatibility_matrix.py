"""scripts/compatibility_matrix.py: cells come only from test results."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compatibility_matrix", ROOT / "scripts" / "compatibility_matrix.py")
matrix = importlib.util.module_from_spec(spec)
spec.loader.exec_module(matrix)

REPORT = """<testsuites><testsuite>
<testcase classname="tests.test_methods_contract" name="test_trainable_parameters_are_exactly_the_methods[LoRA]"/>
<testcase classname="tests.test_methods_contract" name="test_saved_artifact_reproduces_logits[LoRA]"/>
<testcase classname="tests.test_methods_contract" name="test_saved_artifact_reproduces_logits[IA3]"><failure/></testcase>
<testcase classname="tests.test_methods_contract" name="test_trainable_parameters_are_exactly_the_methods[IA3]"/>
<testcase classname="tests.test_methods_contract" name="test_frozen_weights_go_bf16[LoRA-True]"/>
<testcase classname="tests.test_distributed" name="test_two_processes_train_like_one[DoRA-bf16-mixed]"/>
<testcase classname="tests.test_distributed" name="test_two_processes_train_like_one[DoRA-32-true]"><skipped/></testcase>
<testcase classname="tests.test_distributed" name="test_rank_shards_split_the_seeded_order"/>
<testcase classname="tests.test_distributed" name="test_fsdp_two_processes_train_like_one[QLoRA-bf16-mixed]"/>
<testcase classname="tests.test_distributed" name="test_fsdp_adapter_reloads[QLoRA-bf16-mixed]"><failure/></testcase>
<testcase classname="tests.test_distributed" name="test_fsdp_adapter_reloads[LoRA-32-true]"/>
<testcase classname="tests.test_gpu" name="test_fsdp_gpu[LoRA-fsdp-bf16-mixed]"/>
</testsuite></testsuites>"""


def test_cells_are_pass_only_from_tests_that_ran_and_passed(tmp_path):
    path = tmp_path / "report.xml"
    path.write_text(REPORT)
    cells = matrix.collect([path])
    single, ddp32, ddp16 = matrix.COLUMNS[0], matrix.COLUMNS[1], matrix.COLUMNS[2]
    assert cells[("LoRA", single)] == "pass"
    assert cells[("IA3", single)] == "FAIL"  # one failing test of the cell fails it, whatever passed
    assert cells[("DoRA", ddp16)] == "pass" and cells[("DoRA", ddp32)] == "not run"
    fsdp32, fsdp16, fsdp_gpu = (matrix.FSDP_CPU, "32-true"), (matrix.FSDP_CPU, "bf16-mixed"), matrix.GPU_COLUMNS[0]
    assert cells[("QLoRA", fsdp16)] == "FAIL" and cells[("LoRA", fsdp32)] == "pass"  # FSDP tests go to FSDP cells
    assert cells[("LoRA", fsdp_gpu)] == "pass" and ("LoRA", ddp32) not in cells and len(cells) == 7
    page = matrix.render(cells, "test hardware")
    assert "| LoRA | **pass** | *not run* |" in page and "| IA3 | **FAIL** |" in page
    rows = [line for line in page.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == len(matrix.METHODS) and sum(r.count("**pass**") for r in rows) == 4
    assert "test hardware" in page
