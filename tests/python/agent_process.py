"""Child interpreter for the Ctrl-C and exit tests: `agent_process.py URL TOKEN AGENT_ID MODE`.

Runs an agent with one step function, `hold` (waits for its cancel) and a daemon thread that
iterates the agent's events, printing `registered` once registered. MODE `run`: blocks in
`Agent.run()` and prints how it ended. MODE `exit`: started in the background, the interpreter
exits when stdin closes, without shutting the agent down.
"""

import sys
import threading

import kici_agent

url, token, agent_id, mode = sys.argv[1:5]
agent = kici_agent.Agent(
    url, token=token, agent_id=agent_id, port=0, bind_address="127.0.0.1", cancel_grace=10, shutdown_grace=0.2
)


@agent.step("hold")
def hold(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
    ctx.log("holding")
    if ctx.cancelled.wait(60):
        ctx.log("hold saw the cancel")


def follow_events() -> None:
    # A daemon thread that is still iterating when the interpreter exits.
    for event in agent.events():
        if event.type == "registered":
            print("registered", flush=True)


threading.Thread(target=follow_events, daemon=True).start()
if mode == "run":
    agent.run(grace=0.2)
    print(f"run returned, stopped={agent.state.stopped}", flush=True)
else:
    agent.start()
    sys.stdin.read()
