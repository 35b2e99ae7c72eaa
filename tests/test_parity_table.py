"""`sdfast parity`'s table: every column has a header, the verdict's included."""

import re

from sdfast.measure.parity import ParityReport, Row


def _report(passed: bool) -> ParityReport:
    rows = [Row("1", "unet t=999", "fp32", {"max_abs": 1e-6, "mean_abs": 1e-7, "cosine": 1.0}, "max abs 1e-4", passed)]
    return ParityReport(backend="onnxruntime", engines="engines/tiny", model="tiny", device="cpu", rows=rows)


def test_every_column_has_a_header_and_the_verdict_sits_under_result():
    for passed, verdict in ((True, "ok"), (False, "FAIL")):
        header, rule, row = _report(passed).table().splitlines()[:3]
        starts = [m.start() for m in re.finditer(r"-+", rule)]  # one dash run per column
        assert all(header[s] != " " for s in starts), header  # no column without its header
        assert header[starts[-1]:].strip() == "result"
        assert row[starts[-1]:].strip() == verdict
