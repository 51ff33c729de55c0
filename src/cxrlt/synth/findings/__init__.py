"""Findings: the label names, how conspicuous each one is, and where each one is drawn.

A finding may change the geometry before the base anatomy is drawn (a bigger heart, a flat
diaphragm, a curved spine) and may draw its own sign after it. `SIGNS` lists both steps for
every finding; the functions live in one module per region or family:

- `cardiac`: heart, mediastinum and great vessels, hilar enlargement, hiatal hernia
- `lung`: airspace and interstitial disease, atelectasis, emphysema, fissures, infarction
- `nodules`: focal lung lesions (nodule, mass, lung lesion, granuloma, tuberculosis)
- `pleura`: pleural fluid and thickening, and air outside the lungs (pneumothorax,
  pneumomediastinum, pneumoperitoneum, subcutaneous emphysema)
- `bone`: fractures, osteopenia, scoliosis, kyphosis
- `devices`: tubes, lines, wires and pacemakers
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cxrlt.labels import TASK1_CLASSES, TASK3_CLASSES
from cxrlt.synth.anatomy import _Geo
from cxrlt.synth.canvas import _Ctx
from cxrlt.synth.findings import bone, cardiac, devices, lung, nodules, pleura

FINDINGS: tuple[str, ...] = TASK1_CLASSES + TASK3_CLASSES


# Findings that leave a trace on the lateral view (every finding but Kyphosis shows on the
# frontal view; Kyphosis shows on the lateral view only).
LATERAL_VISIBLE: frozenset[str] = frozenset({
    "Adenopathy", "Atelectasis", "Calcification of the Aorta", "Cardiomegaly", "Consolidation",
    "Edema", "Emphysema", "Enlarged Cardiomediastinum", "Fibrosis", "Fissure", "Fracture",
    "Granuloma", "Hernia", "Hydropneumothorax", "Infarction", "Infiltration", "Kyphosis",
    "Lobar Atelectasis", "Lung Lesion", "Lung Opacity", "Mass", "Nodule", "Pleural Effusion",
    "Pleural Other", "Pleural Thickening", "Pneumomediastinum", "Pneumonia", "Pneumoperitoneum",
    "Pulmonary Hypertension", "Round(ed) Atelectasis", "Subcutaneous Emphysema",
    "Support Devices", "Tortuous Aorta", "Tuberculosis", "Bulla", "Cardiomyopathy", "Hilum",
    "Osteopenia",
})  # fmt: skip

# How visible each finding is on a radiograph. Radiology decides, not frequency: free air
# under the diaphragm, a hydropneumothorax's fluid level, an azygos fissure or a displaced
# clavicle are rare and obvious; a pulmonary embolism, an infarct or an acute rib fracture
# are subtle, as in life. Each grade has a target signal at the demo's training resolution
# (`bench/bench_conspicuity.py` measures it: the L2 norm of the image with minus without the
# finding, both downsampled to 128 px, median over anatomies and views).
GRADES: dict[str, str] = {
    **dict.fromkeys((
        "Cardiomegaly", "Cardiomyopathy", "Consolidation", "Edema", "Emphysema",
        "Enlarged Cardiomediastinum", "Hydropneumothorax", "Kyphosis", "Lobar Atelectasis",
        "Mass", "Pleural Effusion", "Pneumoperitoneum", "Scoliosis", "Subcutaneous Emphysema",
    ), "obvious"),
    **dict.fromkeys((
        "Adenopathy", "Atelectasis", "Azygos Lobe", "Bulla", "Fibrosis",
        "Hernia", "Hilum", "Lung Opacity", "Pneumonia", "Pneumothorax",
        "Pulmonary Hypertension", "Support Devices", "Tortuous Aorta", "Tuberculosis",
    ), "clear"),
    **dict.fromkeys((
        "Calcification of the Aorta", "Clavicle Fracture", "Fissure", "Fracture", "Granuloma",
        "Infiltration",
        "Lung Lesion", "Nodule", "Osteopenia", "Pleural Other", "Pleural Thickening",
        "Pneumomediastinum", "Round(ed) Atelectasis",
    ), "moderate"),
    **dict.fromkeys(("Infarction", "Pulmonary Embolism", "Rib Fracture"), "subtle"),
    "Normal": "none",
}  # fmt: skip
# Signal (see above) each grade aims at; a sign drawn stronger than its grade's target by
# design is left as it is.
GRADE_SIGNAL: dict[str, float] = {"obvious": 1000.0, "clear": 600.0, "moderate": 350.0,
                                  "subtle": 100.0, "none": 0.0}  # fmt: skip

# Strength multiplier per finding (contrast, and size or displacement where the drawing
# scales them; 0 = invisible): the gains that bring each sign to its grade's signal,
# calibrated with `bench/bench_conspicuity.py`. Read at render time, so it can be changed
# between calls (a test or a probe of "what if this finding were fainter").
CONSPICUITY: dict[str, float] = {
    **{name: 1.0 for name in FINDINGS},
    "Adenopathy": 1.5, "Bulla": 3.0, "Azygos Lobe": 2.0, "Calcification of the Aorta": 5.0, "Fibrosis": 1.8,
    "Fissure": 4.0, "Fracture": 3.0, "Granuloma": 3.0, "Hernia": 2.2, "Hilum": 1.5,
    "Hydropneumothorax": 1.5, "Lobar Atelectasis": 3.0, "Lung Lesion": 1.4, "Mass": 2.3,
    "Nodule": 2.5, "Pleural Other": 3.0, "Pleural Thickening": 3.0, "Pneumomediastinum": 3.0,
    "Pneumoperitoneum": 4.0, "Pneumothorax": 2.5, "Pulmonary Hypertension": 1.5, "Rib Fracture": 2.0,
    "Round(ed) Atelectasis": 2.0, "Subcutaneous Emphysema": 5.5, "Support Devices": 1.6, "Tuberculosis": 2.5,
}  # fmt: skip


Adjust = Callable[[_Geo, np.random.Generator], None]  # changes the geometry in place
Draw = Callable[[_Ctx], None]  # adds the finding's sign to the context's layers

# Every finding in FINDINGS order: (geometry change, drawing), None where it has no such step.
SIGNS: dict[str, tuple[Adjust | None, Draw | None]] = {
    "Adenopathy": (None, cardiac.adenopathy),
    "Atelectasis": (lung.atelectasis_geo, lung.atelectasis),
    "Azygos Lobe": (None, lung.azygos_lobe),
    "Calcification of the Aorta": (None, cardiac.aortic_calcification),
    "Cardiomegaly": (cardiac.cardiomegaly_geo, None),
    "Clavicle Fracture": (bone.clavicle_fracture_geo, None),
    "Consolidation": (None, lung.consolidation),
    "Edema": (None, lung.edema),
    "Emphysema": (lung.emphysema_geo, None),
    "Enlarged Cardiomediastinum": (cardiac.enlarged_cm_geo, cardiac.enlarged_cm),
    "Fibrosis": (lung.fibrosis_geo, lung.fibrosis),
    "Fissure": (None, lung.fissure),
    "Fracture": (bone.fracture_geo, bone.fracture),
    "Granuloma": (None, nodules.granuloma),
    "Hernia": (None, cardiac.hernia),
    "Hydropneumothorax": (None, pleura.hydropneumothorax),
    "Infarction": (None, lung.infarction),
    "Infiltration": (None, lung.infiltration),
    "Kyphosis": (bone.kyphosis_geo, None),
    "Lobar Atelectasis": (None, lung.lobar_atelectasis),
    "Lung Lesion": (None, nodules.lung_lesion),
    "Lung Opacity": (None, lung.lung_opacity),
    "Mass": (None, nodules.mass),
    "Nodule": (None, nodules.nodule),
    "Normal": (None, None),
    "Pleural Effusion": (None, pleura.pleural_effusion),
    "Pleural Other": (None, pleura.pleural_other),
    "Pleural Thickening": (None, pleura.pleural_thickening),
    "Pneumomediastinum": (None, pleura.pneumomediastinum),
    "Pneumonia": (None, lung.pneumonia),
    "Pneumoperitoneum": (None, pleura.pneumoperitoneum),
    "Pneumothorax": (None, pleura.pneumothorax),
    "Pulmonary Embolism": (None, lung.pulmonary_embolism),
    "Pulmonary Hypertension": (cardiac.pulm_htn_geo, cardiac.pulm_htn),
    "Rib Fracture": (None, bone.rib_fracture),
    "Round(ed) Atelectasis": (None, lung.rounded_atelectasis),
    "Subcutaneous Emphysema": (None, pleura.subcutaneous_emphysema),
    "Support Devices": (None, devices.support_devices),
    "Tortuous Aorta": (cardiac.tortuous_aorta_geo, None),
    "Tuberculosis": (None, nodules.tuberculosis),
    "Bulla": (None, lung.bulla),
    "Cardiomyopathy": (cardiac.cardiomyopathy_geo, None),
    "Hilum": (None, cardiac.hilum),
    "Osteopenia": (bone.osteopenia_geo, None),
    "Scoliosis": (bone.scoliosis_geo, None),
}
ADJUST: dict[str, Adjust] = {n: adjust for n, (adjust, _) in SIGNS.items() if adjust is not None}
DRAW: dict[str, Draw] = {n: draw for n, (_, draw) in SIGNS.items() if draw is not None}
