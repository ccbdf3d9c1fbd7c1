"""What the user looks at: slice and diagnostic arrays (:mod:`~dipuq.show.prepare`, numpy only),
PNG figures (:mod:`~dipuq.show.viz`, the only module importing matplotlib) and the
self-contained HTML report (:mod:`~dipuq.show.report`)."""
