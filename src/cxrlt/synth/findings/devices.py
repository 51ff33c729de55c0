"""Support devices: tubes, lines, wires, pacemakers and the like."""

from __future__ import annotations

import numpy as np

from cxrlt.synth.canvas import _Ctx, _polygon, _polyline, _ring


def _box(x: float, y: float, wd: float, ht: float) -> np.ndarray:
    return np.array([(x - wd, y - ht), (x + wd, y - ht), (x + wd, y + ht), (x - wd, y + ht)])


def support_devices(c: _Ctx) -> None:
    """Metal and radiopaque tubes: ET tube, NG tube, central line, pacemaker, wires, leads."""
    g = c.geo
    d, amp = c.dens, c.gain
    for kind in c.rng.choice(6, size=int(c.rng.integers(1, 4)), replace=False):
        if c.lateral:
            hx, hy = g.hila[0]
            if kind in (0, 1):  # ET tube in the trachea / NG tube in the oesophagus
                off = 0.0 if kind == 0 else 0.05
                _polyline(
                    c,
                    d,
                    [(hx - 0.07 + off, 0.0), (hx - 0.01 + off, hy - 0.08 + 4 * off)],
                    0.006,
                    0.35 * amp,
                )
            elif kind == 2:  # pacemaker generator, anterior upper chest
                _polygon(
                    c, d, _box(g.ant + 0.03, g.apex + 0.08, 0.018, 0.035), 0.8 * amp, blur=0.002
                )
            elif kind == 3:  # sternotomy wires
                for i in range(5):
                    _ring(c, d, g.ant + 0.022, g.apex + 0.12 + 0.065 * i, 0.008, 0.004, 0.6 * amp)
            else:  # central line / lead into the heart
                _polyline(
                    c,
                    d,
                    [
                        (g.ant + 0.08, 0.05),
                        (g.heart[0] + 0.05, g.apex + 0.25),
                        (g.heart[0], g.heart[1]),
                    ],
                    0.005,
                    0.35 * amp,
                )
            continue
        if kind == 0:  # endotracheal tube: two walls and a radiopaque stripe above the carina
            tip = g.hila[0][1] - 0.08 - c.u(0.03, 0.08)
            for dxw in (-0.008, 0.008):
                _polyline(c, d, [(g.cx + dxw, 0.0), (g.cx + dxw, tip)], 0.003, 0.18 * amp)
            _polyline(c, d, [(g.cx + 0.004, 0.0), (g.cx + 0.004, tip)], 0.003, 0.35 * amp)
        elif kind == 1:  # nasogastric tube into the stomach under the left hemidiaphragm
            pts = [
                (g.cx + 0.01, 0.0),
                (g.cx + 0.012, g.hila[0][1]),
                (g.cx + 0.03, g.dia_l),
                (g.cx + 0.15, g.dia_l + 0.06),
                (g.cx + 0.2, g.dia_l + 0.03),
            ]
            _polyline(c, d, pts, 0.005, 0.35 * amp)
        elif kind == 2:  # central venous line from a subclavian vein to the SVC
            s = c.side()
            pts = [
                (g.cx + s * 0.3, g.clav_y + 0.02),
                (g.cx + s * 0.12, g.clav_y + 0.04),
                (g.cx - 0.04, g.clav_y + 0.08),
                (g.cx - 0.035, g.hila[0][1] - c.u(0.0, 0.06)),
            ]
            _polyline(c, d, pts, 0.005, 0.3 * amp)
        elif kind == 3:  # pacemaker: bright box below the left clavicle, leads to the heart
            px_, py_ = g.cx + c.u(0.18, 0.28), g.clav_y + c.u(0.04, 0.08)
            _polygon(c, d, _box(px_, py_, 0.045, 0.032), 0.8 * amp, blur=0.003)
            hx, hy, _, hry, _ = g.heart
            for tx, ty in ((hx - 0.03, hy - hry * 0.4), (hx + 0.03, hy + hry * 0.3)):
                pts = [
                    (px_ - 0.045, py_),
                    (g.cx + 0.01, g.clav_y + 0.1),
                    (g.cx - 0.03, hy - hry),
                    (tx, ty),
                ]
                _polyline(c, d, pts, 0.004, 0.45 * amp)
        elif kind == 4:  # sternotomy wires along the midline
            for i in range(int(c.rng.integers(4, 7))):
                _ring(
                    c,
                    d,
                    g.cx + c.u(-0.004, 0.004),
                    g.apex + 0.12 + 0.055 * i,
                    0.008,
                    0.004,
                    0.6 * amp,
                )
        else:  # ECG electrodes with wires
            for _ in range(int(c.rng.integers(2, 5))):
                x, y = c.u(0.1, 0.9), c.u(0.08, 0.7)
                _ring(c, d, x, y, 0.012, 0.004, 0.3 * amp)
                _polyline(c, d, [(x, y), (x + c.u(-0.2, 0.2), y - 0.2)], 0.003, 0.2 * amp)
