"""The deep image prior: the U-Net (:mod:`~dipuq.dip.networks`), the fit as a generator of states
with its stop rules (:mod:`~dipuq.dip.fit`), its checkpoints (:mod:`~dipuq.dip.checkpoint`), the
driver that runs it to the end (:mod:`~dipuq.dip.driver`) and the reconstruction baselines
(:mod:`~dipuq.dip.baselines`: FBP/FDK, SIRT, CGLS, TV, DIP, MC dropout, fixed σ)."""
