"""Three-level evaluation of image-restoration models on simulated data.

Level 1, pixels (:mod:`~models.evaluation.pixel`): RMSE, PSNR, SSIM, MS-SSIM.
Level 2, uncertainty (:mod:`~models.evaluation.calibration`): coverage, sparsification/AUSE,
split-conformal scaling.
Level 3, clinical-ish tasks: hallucination detection (:mod:`~models.evaluation.hallucination`),
low-contrast detail and NPW d' (:mod:`~models.evaluation.lesions`), feature-space distances with
the in-house "sim-encoder" (:mod:`~models.evaluation.features`).
:mod:`~models.evaluation.report` writes ``report.json`` and a self-contained ``report.html`` from
the nested results dict of :mod:`~models.evaluation.results`.

Only numpy, scipy, scikit-image, scikit-learn, torch, MONAI, safetensors, matplotlib and
``models.*`` are imported here (no DICOM).
"""
