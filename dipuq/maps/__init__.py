"""What the samples become: the mean/std maps (:mod:`~dipuq.maps.uncertainty`), their calibration
on the held-out projections (:mod:`~dipuq.maps.calibration`) and the metrics against a reference
(:mod:`~dipuq.maps.metrics`)."""
