"""The linearised-DIP posterior: the network linearised at θ* (:mod:`~dipuq.posterior.linearise`),
the g-prior scales (:mod:`~dipuq.posterior.gprior`), the one choice of the noise variance σ²
(:mod:`~dipuq.posterior.noise`) and the :class:`~dipuq.posterior.model.Posterior` with J̃, AJ̃,
H and K + σ²I as composed operators (:mod:`~dipuq.posterior.model`)."""
