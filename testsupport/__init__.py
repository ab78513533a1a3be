"""What the tests, the fault suite and the bench share to drive the real stack: service processes
started as users start them, and waiting on conditions with a bound."""
