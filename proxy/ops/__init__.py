"""Operations, as plain data and pure functions: what several workers' metrics and
events add up to (``metrics_merge``, ``events``), and the admin status page
(``status_page``). The I/O that moves the data between processes is
``proxy.server.worker_stats``. ``health`` is the one client here: the ``tlsproxy health``
command, which asks a running proxy what its config says to ask."""
