"""A run directory from a scan: the configuration (:mod:`~dipuq.run.config`), the stage records
(:mod:`~dipuq.run.stages`), the driver (:mod:`~dipuq.run.pipeline`), what a rerun may reuse
(:mod:`~dipuq.run.resume`), provenance (:mod:`~dipuq.run.provenance`) and the folder's layout,
checksums and lock (:mod:`~dipuq.run.rundir`)."""
