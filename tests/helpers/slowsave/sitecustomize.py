"""Test-only: every checkpoint file takes SLOW_SAVE_S seconds longer to write (put this folder on PYTHONPATH).

The delay falls after the bytes are in the hidden temporary file and before it is published, so a test can
kill the process while a background write is in flight."""

import os

if os.environ.get("SLOW_SAVE_S"):
    import importlib.abc
    import importlib.machinery
    import sys
    import time

    def _slow(module):
        original, delay = module.save_file, float(os.environ["SLOW_SAVE_S"])

        def slow_save_file(obj, path):
            result = original(obj, path)
            time.sleep(delay)
            return result

        module.save_file = slow_save_file

    class _Patch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "trainer.checkpoint.io":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _slow(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Patch())
