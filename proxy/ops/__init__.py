"""Operations, as plain data and pure functions: what several workers' metrics and
events add up to (``metrics_merge``, ``events``), and the admin status page
(``status_page``). The I/O that moves the data between processes is
``proxy.server.worker_stats``; ``health`` is the ``tlsproxy health`` command."""
