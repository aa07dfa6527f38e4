"""The memory planner: activation inventory, cost model and MILP -> Plan (issue: planner). Imports no torch."""
