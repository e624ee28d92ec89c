"""The papers' reproduction items (``asymprop reproduce``), one module per paper, built on the
harness: :mod:`.akrout` (001), :mod:`.liao` (002), :mod:`.lansdell` (004), :mod:`.convergence`
(KP's and WM's theory, 003 and 000) and :mod:`.study` (modern architectures, beyond the seeds);
:mod:`.common` holds what they share. :mod:`asymprop.harness.reproduce` registers them and runs
them."""
