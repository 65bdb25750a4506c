"""Data package: the embedded detector's shipped weights (a package so that
setuptools' ``package-data`` ``*.pth`` pattern ships them in wheels)."""
