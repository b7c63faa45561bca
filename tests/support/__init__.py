"""Test helpers, not tests: the numpy policy oracle (policy_oracle.py) and the kernel test cases (kernel_cases.py)."""
