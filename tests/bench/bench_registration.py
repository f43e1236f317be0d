"""Registration benchmark: accuracy distribution and time per registration, SIMULATED.

Rigid: ``--cases`` seeded random rigid transforms (rotations about x, y and z each uniform
in ±10°, shifts of uniform length 0-20 mm; see ``tests/test_registration.py``) applied to
a simulated T1w head (128 x 128 x 50, 1.95 x 1.95 x 2 mm), each prior with its own noise
and a 1.15 intensity scale. Reports the largest displacement over the head mask and the
rotation error (median, 95th percentile, max), the quality figures and the seconds per
registration. Then a few affine (scaled) pairs, and one rigid pair at about 1 mm
(256 x 256 x 100), which the working grid bins to 2 mm first. Not a timed test.

Usage: ``python tests/bench/bench_registration.py [--cases 50]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipelines.registration import register  # noqa: E402
from tests.test_registration import distribution, make_case, transform_error  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=50)
    args = parser.parse_args()

    displacement, rotation, seconds, dice, mi, angles, shifts = [], [], [], [], [], [], []
    for seed in range(1, args.cases + 1):
        case = make_case(seed)
        started = time.perf_counter()
        registration = register(case.current, case.prior, mode="rigid")
        seconds.append(time.perf_counter() - started)
        d, r = transform_error(registration.matrix, case.truth, case.current)
        displacement.append(d)
        rotation.append(r)
        dice.append(registration.dice)
        mi.append(registration.mutual_information)
        angles.append(max(abs(a) for a in case.angles_deg))
        shifts.append(float(np.linalg.norm(case.shift_mm)))
        print(
            f"seed {seed:3d}: angles {np.round(case.angles_deg, 1).tolist()} deg, "
            f"shift {shifts[-1]:5.1f} mm -> {d:.3f} mm, {r:.3f} deg, "
            f"Dice {registration.dice:.3f}, MI {registration.mutual_information:.3f}, "
            f"{seconds[-1]:.1f} s, ok {registration.quality_ok}",
            flush=True,
        )
    print(f"\nSIMULATED rigid, {args.cases} cases (largest angle per case up to {max(angles):.1f} deg, "
          f"shifts up to {max(shifts):.1f} mm)")  # fmt: skip
    print(f"  max displacement over the head (mm): {distribution(displacement)}")
    print(f"  rotation error (deg):                {distribution(rotation)}")
    within = sum(d <= 1.0 and r <= 0.5 for d, r in zip(displacement, rotation, strict=True))
    print(f"  within 1 mm and 0.5 deg:             {within} of {args.cases}")
    print(f"  body-mask Dice:                      {distribution(dice)} (min {min(dice):.3f})")
    print(f"  mutual information (nats):           {distribution(mi)} (min {min(mi):.3f})")
    print(f"  seconds per registration:            {distribution(seconds)}")

    affine_errors, affine_seconds = [], []
    for seed, scaling in ((201, (1.06, 0.95, 1.03)), (202, (0.94, 1.05, 1.0)), (203, (1.03, 1.03, 0.96))):
        case = make_case(seed, linear=np.diag(scaling))
        started = time.perf_counter()
        registration = register(case.current, case.prior, mode="affine")
        affine_seconds.append(time.perf_counter() - started)
        d, _ = transform_error(registration.matrix, case.truth, case.current)
        affine_errors.append(d)
        print(f"affine seed {seed} scaling {scaling}: {d:.3f} mm, {affine_seconds[-1]:.1f} s")
    print(
        f"SIMULATED affine: max displacement {distribution(affine_errors)}; "
        f"seconds {distribution(affine_seconds)}"
    )

    fine_seconds = _fine_head()
    print(f"SIMULATED 256 x 256 x 100 head (~1 mm), rigid: {fine_seconds:.1f} s")
    return 0


def _fine_head() -> float:
    """Time one rigid registration of a ~1 mm head (binned to the 2 mm working grid)."""
    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    from models.sim.mrct import make_pair
    from tests import test_registration as t

    pair = make_pair(3, slices=100, size=256, slice_thickness_mm=1.0, noise=(0.0, 0.0), level=0.5)
    spacing = (1.0, 250.0 / 256, 250.0 / 256)
    clean = pair.t1w.astype(np.float32)
    image = t.grid_image(clean, spacing)
    truth = t.rigid_matrix((6.0, -4.0, 8.0), np.array([10.0, -8.0, 5.0]), t.grid_centre(image))
    rng = np.random.default_rng(5)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(truth[:3, :3].ravel().tolist())
    transform.SetTranslation(truth[:3, 3].tolist())
    prior_pixels = sitk.GetArrayFromImage(sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0))
    current = t.mr_series(
        t.rician(clean, rng), t.Study(generate_uid(), generate_uid()), 3, "current", spacing
    )
    prior_study = t.Study(generate_uid(), generate_uid())
    prior = t.mr_series(t.rician(1.15 * prior_pixels, rng), prior_study, 2, "prior", spacing)
    started = time.perf_counter()
    registration = register(current, prior)
    seconds = time.perf_counter() - started
    d, r = transform_error(registration.matrix, truth, current)
    print(f"~1 mm head: {d:.3f} mm, {r:.3f} deg, Dice {registration.dice:.3f}")
    return seconds


if __name__ == "__main__":
    raise SystemExit(main())
