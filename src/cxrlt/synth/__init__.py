"""The built-in synthetic dataset: procedural radiographs written in the real datasets' layouts.

Apart from the real-data adapters in `cxrlt.data`, which read these files exactly as they read
the real downloads. Modules:

- `mimic`: studies, patients, views and labels; writes MIMIC-CXR-JPG + the CXR-LT 2024 CSVs
- `external`: small NIH ChestX-ray14, CheXpert and VinDr-CXR (DICOM) sources
- `render`: one radiograph from a list of findings (how an image is made: its docstring)
- `anatomy`: patient habitus, per-image geometry, lung / diaphragm / rib / spine curves
- `canvas`: the drawing context, texture banks and rasterising primitives
- `base`: the normal frontal and lateral chest every image starts from
- `findings`: label names, conspicuity, and the table of each finding's drawing functions,
  one module per region (`cardiac`, `lung`, `nodules`, `pleura`, `bone`, `devices`)
"""
