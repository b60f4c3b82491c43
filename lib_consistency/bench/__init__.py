"""Speed and memory benchmarks: what each method costs against plain generation (``python -m lib_consistency.bench``).

Quality -- how consistent the frames are -- is measured by ``lib_consistency.evaluate`` instead.
"""
