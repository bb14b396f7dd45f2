"""Scale-out: engines as Ray actors (``actor``) and the front-end's pool of them (``pool``); needs the ``ray``
extra."""
