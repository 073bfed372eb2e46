"""Work beyond one machine, on Ray: tensor encoding and calibrated rounding as Ray tasks
(``ray_tasks``). Needs the ``ray`` extra (``pip install 'rbe[ray]'``)."""
