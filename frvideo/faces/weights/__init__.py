"""Data package: the embedded detector's shipped landmark CNN (a package so that
setuptools' ``package-data`` ``*.pth`` pattern ships it in wheels)."""
