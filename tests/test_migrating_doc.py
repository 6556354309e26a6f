"""Every ```python block of docs/migrating.md runs, in order, in one namespace (the guide builds
its examples on the tensors of its first block), and its assertions hold."""
import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "migrating.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def blocks():
    return BLOCK.findall(DOC.read_text())


def test_the_guide_has_code_for_every_distiller():
    text = "\n".join(blocks())
    for name in ("simclr_moco_loss_func", "moco_pnr_loss_func", "byol_loss_func", "barlow_loss_func",
                 "invariance_loss", "simclr_distill_loss_func", "PreviousModelQueue", "differentiable_all_reduce"):
        assert name in text, name
    # every fence that opens a code block is a python block, so none is skipped by the extraction
    fences = re.findall(r"^```(\w*)$", DOC.read_text(), re.M)
    assert fences and all(f in ("python", "") for f in fences) and fences.count("python") == len(blocks())


def test_every_snippet_runs():
    namespace = {"__name__": "migrating_doc"}
    for number, code in enumerate(blocks(), 1):
        try:
            exec(compile(code, f"{DOC.name} block {number}", "exec"), namespace)
        except Exception as error:  # say which block, then re-raise with its traceback
            raise AssertionError(f"docs/migrating.md python block {number} failed: {error!r}\n{code}") from error
