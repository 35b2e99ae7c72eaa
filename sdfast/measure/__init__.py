"""Measurement: ``sdfast bench`` (``bench``, ``report``, ``fewstep``), FLOP counts (``flops``) and
``sdfast parity`` (``parity``)."""
