-- Argo CD health of a kubeonnx InferenceModel, from the operator's status.
-- Runs with Argo CD's libraries only (base, table, a safe os): no string or math.
local hs = {}
local status = obj.status
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubeonnx operator to report status"
  return hs
end
if status.observedGeneration == nil or status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubeonnx operator to observe the latest spec"
  return hs
end
local ready = nil
for _, condition in ipairs(status.conditions) do
  if condition.type == "Ready" then
    ready = condition
  end
end
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end
local message = ready.message or ""
if ready.reason ~= nil then
  message = ready.reason .. ": " .. message
end
hs.message = message
if ready.status == "True" then
  hs.status = "Healthy"
elseif ready.reason == "Progressing" then
  hs.status = "Progressing"
else
  -- ModelLoadFailed, CrashLoop, ImagePullFailed, Unschedulable, InvalidSpec, ChildConflict,
  -- ReconcileError, ...: the status message says what to fix.
  hs.status = "Degraded"
  return hs
end
-- A candidate version's rollout: rolled back is Degraded (the candidate failed its analysis
-- and gets no traffic until its spec changes); paused for a person is Suspended.
local rollout = status.rollout
if rollout ~= nil and rollout.phase == "RolledBack" then
  hs.status = "Degraded"
  hs.message = "RolledBack: " .. (rollout.message or "")
elseif rollout ~= nil and rollout.phase == "Paused" then
  hs.status = "Suspended"
  hs.message = "Paused: " .. (rollout.message or "")
end
return hs
