import sys

from ibot.cli import main

if __name__ == "__main__":  # ``python -m ibot``; importing the module (tests/test_imports.py) runs nothing
    sys.exit(main())
