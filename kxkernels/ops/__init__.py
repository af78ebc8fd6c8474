"""One sub-package per op: public function + registration, reference.py, triton.py."""
