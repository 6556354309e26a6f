"""A second, independent statement of every loss: per-row Python loops over the definitions in
docs/losses.md, in numpy float64. It shares no code with pnr_kernels.reference (which is
vectorised PyTorch), so agreement between the two checks the reference itself. Tiny inputs only.
"""
import math

import numpy as np


def _unit(x):
    return np.array([row / max(math.sqrt(float(row @ row)), 1e-12) for row in x])


def _lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def simclr_pnr(z1, z2, p1, p2, f1, f2, temperature):
    b = len(z1)
    n = 2 * b
    z, p, f = _unit(np.concatenate([z1, z2])), _unit(np.concatenate([p1, p2])), _unit(np.concatenate([f1, f2]))
    t = temperature
    main, reg = [], []
    for i in range(n):
        other = (i + b) % n
        negatives = [z[i] @ z[j] / t for j in range(n) if j != i] + [z[i] @ f[j] / t for j in range(n) if j != i]
        main.append(-z[i] @ z[other] / t + _lse(negatives))
        negatives = [p[i] @ f[j] / t for j in range(n) if j != i] + [p[i] @ z[j] / t for j in range(n) if j != i]
        reg.append(-p[i] @ f[i] / t + _lse(negatives))
    return sum(main) / n + sum(reg) / n


def nt_xent(z1, z2, temperature):
    b = len(z1)
    n = 2 * b
    z = _unit(np.concatenate([z1, z2]))
    t = temperature
    return sum(-z[i] @ z[(i + b) % n] / t + _lse([z[i] @ z[j] / t for j in range(n) if j != i])
               for i in range(n)) / n


def _ce(anchors, positives, queue, t):
    total = 0.0
    for a, pos in zip(anchors, positives):
        total += -a @ pos / t + _lse([a @ pos / t] + [a @ q / t for q in queue])
    return total / len(anchors)


def moco_pnr(q1, q2, k1, k2, p1, p2, f1, f2, key_queue, prev_queue, temperature, distill_temperature):
    q1, q2, k1, k2, p1, p2, f1, f2 = (_unit(x) for x in (q1, q2, k1, k2, p1, p2, f1, f2))
    view0 = list(key_queue[0]) + list(prev_queue[0])
    view1 = list(key_queue[1]) + list(prev_queue[1])
    t, td = temperature, distill_temperature
    return (_ce(q1, k2, view1, t) + _ce(p1, f1, view1, td) + _ce(q2, k1, view0, t) + _ce(p2, f2, view0, td)) / 2


def moco(q1, q2, k1, k2, key_queue, temperature):
    q1, q2, k1, k2 = (_unit(x) for x in (q1, q2, k1, k2))
    return (_ce(q1, k2, list(key_queue[1]), temperature) + _ce(q2, k1, list(key_queue[0]), temperature)) / 2


def cassle_simclr(p1, p2, f1, f2, temperature):
    p, f = _unit(np.concatenate([p1, p2])), _unit(np.concatenate([f1, f2]))
    t = temperature

    def d(a, c):
        return sum(-a[i] @ c[i] / t + _lse([a[i] @ c[j] / t for j in range(len(c))]) for i in range(len(a))) / len(a)

    return (d(p, f) + d(f, p)) / 2


def _cos(a, b):
    return float(a @ b) / (max(math.sqrt(float(a @ a)), 1e-8) * max(math.sqrt(float(b @ b)), 1e-8))


def _mean_cos(a, b):
    return sum(_cos(x, y) for x, y in zip(a, b)) / len(a)


def _mse(a, b):
    return sum(float((x - y) @ (x - y)) for x, y in zip(a, b)) / a.size


def _barlow(a, b, off_diagonal_weight, scale):
    n, d = a.shape

    def column_stats(x, j):
        mean = sum(x[i, j] for i in range(n)) / n
        var = sum((x[i, j] - mean) ** 2 for i in range(n)) / n
        return mean, math.sqrt(var + 1e-5)

    sa = [column_stats(a, j) for j in range(d)]
    sb = [column_stats(b, j) for j in range(d)]
    loss = 0.0
    for j in range(d):
        for k in range(d):
            c = sum((a[i, j] - sa[j][0]) / sa[j][1] * (b[i, k] - sb[k][0]) / sb[k][1] for i in range(n)) / n
            loss += (c - 1) ** 2 if j == k else off_diagonal_weight * c ** 2
    return scale * loss


def _pnr(pos, neg, p1, p2, f1, f2, wd, wn):
    return wd * (pos(p1, f1) + pos(p2, f2)) / 2 - wn * (neg(p1, f2) + neg(p2, f1)) / 2


def byol_pnr(p1, p2, f1, f2, distill_weight=1.0, negative_weight=0.5):
    def term(p, f):
        return 2 - 2 * _mean_cos(p, f)
    return _pnr(term, term, p1, p2, f1, f2, distill_weight, negative_weight)


def vicreg_pnr(p1, p2, f1, f2, distill_weight=25.0, negative_weight=23.0):
    return _pnr(_mse, _mse, p1, p2, f1, f2, distill_weight, negative_weight)


def barlow_pnr(p1, p2, f1, f2, distill_weight=1.0, negative_weight=1.0, off_diagonal_weight=5e-3, scale=0.1):
    def pos(p, f):
        return _barlow(p, f, off_diagonal_weight, scale)

    def neg(p, f):
        return -_mean_cos(p, f)
    return _pnr(pos, neg, p1, p2, f1, f2, distill_weight, negative_weight)
