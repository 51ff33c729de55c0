"""Stage zeroshot: CXR-LT Task 3 (five findings never trained on) from label-text embeddings."""

from cxrlt.gpus import claims_gpus
from cxrlt.params import load_params
from cxrlt.stage import run_stage
from cxrlt.zeroshot import run


def _f(x: float | None) -> str:
    return "n/a (no labels)" if x is None else f"{x:.4f}"


@claims_gpus("zeroshot")
def main() -> None:
    r = run(load_params())
    print(f"zeroshot: Task 3 from the label texts ({r['encoder']}), head trained on the Task 1 classes "
          f"(val mAP {r['val_mAP']:.4f}); test mAP {_f(r['test_mAP'])} against prevalence "
          f"{_f(r['test_prevalence_mAP'])}, supervised reference {_f(r['reference_mAP'])} -> {r['submission']}")


if __name__ == "__main__":
    run_stage(main)
