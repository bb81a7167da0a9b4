"""Side-by-side benchmarks: qmpjobd against qemu-storage-daemon 7.2 (``python -m bench``).

Layout: ``targets.py`` (workloads and targets, as data), ``workloads/`` (one function
per workload and repetition), ``client.py`` (the raw-socket client both daemons get),
``procs.py`` (daemons and /proc counters), ``report.py`` (table, JSON), and two
diagnosis tools: ``profile.py`` (py-spy) and ``memtrace.py`` (tracemalloc).
"""
