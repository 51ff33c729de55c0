"""Stage prepare: CXR-LT label CSVs -> image-level manifest with a patient-level val split."""

from cxrlt.data.manifest import summary, validate_manifest
from cxrlt.data.mimic import read_cxrlt
from cxrlt.data.splits import patient_val_split
from cxrlt.errors import DataError
from cxrlt.io import write_parquet
from cxrlt.labels import training_classes
from cxrlt.params import load_params
from cxrlt.stage import run_stage


def main() -> None:
    params = load_params()
    data, split = params["data"], params["split"]
    task = params["task"]
    if task == "task3":
        raise DataError("params task: task3 is zero-shot: the zeroshot stage answers it in every run "
                        "(learning from the Task 1 labels) and writes its submission; set task: task1 or task2")
    classes = list(training_classes(task))
    df = read_cxrlt(data["cxrlt_root"], data["mimic_root"], task, check_files=bool(data["check_files"]),
                    files=data.get("files"))
    df["split"] = patient_val_split(df, classes, float(split["val_fraction"]), int(split["seed"]))
    validate_manifest(df, classes, data["manifest"])
    write_parquet(data["manifest"], df)
    print(summary(df, classes))


if __name__ == "__main__":
    run_stage(main)
