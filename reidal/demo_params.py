"""The demo's parameters for small collections (a few hundred images), in a module of their
own so the command line can show them as defaults without importing the algorithms.

Used by `reidal demo`, the benchmark suite (reidal.benchmark) and the tests.
"""

#: Default budget per cycle, as a fraction of all pairs of the pool. The paper's 0.02 % is
#: meant for collections of thousands of images; on the demo's few hundred it would be a
#: handful of pairs, so the demo asks 0.5 % per cycle (a few hundred answers in all).
DEMO_BUDGET_PER_CYCLE = 0.005
#: SpCL's k1=30 assumes thousands of images and identities of tens of images; the demo's
#: identities hold 4-16 images, so the reciprocal neighbourhoods are scaled down with them.
DEMO_K1 = 10
DEMO_K2 = 3
#: DBSCAN's minimum cluster size for identities of 4-16 images.
DEMO_MIN_SAMPLES = 2
